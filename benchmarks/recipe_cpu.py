"""CPU time per frame of the recurrent PPO recipe, by core: GRU(64) against MoP cores.

    python benchmarks/recipe_cpu.py --task cartpole --batches 6
    python benchmarks/recipe_cpu.py --task pendulum --variants gru lstm "mop:0,16,32;0,16,32"

Builds ``examples/recurrent_ppo.py``'s env, actor, critic, learner and collector once per
variant (``gru``, ``lstm``, ``mop:LAYERS``, or any of them with ``+CRITIC``, the critic's own
core kind: ``mop+gru``), then times what one batch costs the recipe:
collecting it (env + both cores' steps) and its update (GAE and the epochs,
``ppo_update``), as process CPU time per frame. The variants take turns batch by batch in one
process, so that load on a shared machine falls on all of them alike; the medians and their
ratios to the first variant are printed (and written as JSON with ``--out``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEFAULT_VARIANTS = ["gru", "mop:0,16,32;0,16,32;0,16,32", "mop:0,32,64"]


def load_recipe():
    """``examples/recurrent_ppo.py`` as a module (its folder importable, as when it runs)."""
    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location("recurrent_ppo", EXAMPLES / "recurrent_ppo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(ppo, task: str, variant: str, seed: int):
    """The recipe's collector iterator, learner and flags for one core variant."""
    kind, _, layers = variant.partition(":")
    kind, _, critic = kind.partition("+")
    flags = ["--env", task, "--core", kind, "--seed", str(seed)]
    flags += ["--critic_core", critic] if critic else []
    args = ppo.parse_args([*flags, *(["--mop_layers", layers] if layers else [])])
    ppo.configure_torch(seed)
    env = ppo.make_recipe_env(args)
    actor, critic, cores = ppo.make_agent(args, env)
    args.frames = -1  # collect until told to stop
    learner = ppo.make_learner(actor, critic, cores, args)
    return iter(ppo.make_collector(env, actor, critic, args)), learner, args


def time_batch(ppo, collector, learner, args) -> tuple[float, float]:
    """CPU ms per frame of collecting one batch, and of its update."""
    start = time.process_time()
    batch = next(collector)
    collected = time.process_time()
    ppo.ppo_update(batch, learner, args)
    done = time.process_time()
    return (collected - start) * 1e3 / batch.numel(), (done - collected) * 1e3 / batch.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=["cartpole", "pendulum"], default="cartpole")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the timings here (JSON)")
    args = parser.parse_args()
    ppo = load_recipe()
    setups = {v: build(ppo, args.task, v, args.seed) for v in args.variants}
    for setup in setups.values():  # one untimed batch each: first-call costs
        time_batch(ppo, *setup)
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in setups}
    for _ in range(args.batches):
        for variant, setup in setups.items():
            times[variant].append(time_batch(ppo, *setup))
    summary = {}
    for variant, rows in times.items():
        collect, update = (statistics.median(r[i] for r in rows) for i in (0, 1))
        summary[variant] = {
            "collect_ms_per_frame": collect,
            "update_ms_per_frame": update,
            "total_ms_per_frame": statistics.median(c + u for c, u in rows),
        }
    base = summary[args.variants[0]]
    print(f"masked {args.task}, {args.batches} batches per variant, CPU ms per frame (medians)")
    print("| core | collect | update | total | total vs " + args.variants[0] + " |")
    print("|---|---|---|---|---|")
    for variant, s in summary.items():
        ratio = s["total_ms_per_frame"] / base["total_ms_per_frame"]
        print(
            f"| {variant} | {s['collect_ms_per_frame']:.3f} | {s['update_ms_per_frame']:.3f} "
            f"| {s['total_ms_per_frame']:.3f} | {ratio:.2f}x |"
        )
    if args.out:
        args.out.write_text(json.dumps({"task": args.task, "summary": summary, "times": times}))


if __name__ == "__main__":
    main()
