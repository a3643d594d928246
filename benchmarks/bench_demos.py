"""Demo generation speed: ``generate_demos`` with 1 and 2 workers vs the bare bot on one core.

The bare bot is a gymnasium BabyAI env (``make_babyai_gym_env(expert=True)``: the bot labels
every observation inside the env) stepped with the bot's actions in a plain Python loop.
``generate_demos`` rows report end-to-end steps/s (worker start-up included) and steady-state
steps/s (after the first episodes were committed). All rows come from one run on one machine;
numbers on a shared machine are noisy.

    OMP_NUM_THREADS=1 python benchmarks/bench_demos.py --level GoToLocal --episodes 400
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torchrl

from mop_torchrl.babyai.demos import generate_demos
from mop_torchrl.babyai.envs import make_babyai_gym_env
from mop_torchrl.babyai.levels import resolve_level


def bare_bot(level: str, steps: int, seed: int = 0) -> float:
    """Steps/s of the bot playing a gymnasium env in a plain loop (one core)."""
    env = make_babyai_gym_env(level, seed=seed, expert=True)
    obs, _ = env.reset()
    t0 = time.perf_counter()
    for _ in range(steps):
        label = int(obs["expert_action"])
        obs, _, terminated, truncated, _ = env.step(label if label >= 0 else 0)
        if terminated or truncated:
            obs, _ = env.reset()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--level", default="GoToLocal")
    parser.add_argument("--episodes", type=int, default=400, help="episodes per demo run")
    parser.add_argument("--bare-steps", type=int, default=3000)
    parser.add_argument(
        "--configs",
        default="collector:1,collector:2,parallel_env:2",
        help="comma-separated backend:workers runs",
    )
    parser.add_argument("--json", default=None, help="output (default bench_results/...)")
    args = parser.parse_args()
    level = resolve_level(args.level)

    rows = [{"name": "bare bot, gymnasium loop", "workers": 1, "steps_per_s": None}]
    rows[0]["steady_steps_per_s"] = bare_bot(level, args.bare_steps)
    for spec in args.configs.split(","):
        backend, workers = spec.split(":")
        with tempfile.TemporaryDirectory() as out:
            s = generate_demos(
                level, args.episodes, out, num_workers=int(workers), progress=False,
                backend=backend,
            )  # fmt: skip
        rows.append(
            {
                "name": f"generate_demos {backend}",
                "workers": int(workers),
                "steps_per_s": s["steps_per_s"],
                "steady_steps_per_s": s["steady_steps_per_s"],
                "startup_s": s["startup_s"],
                "frames": s["frames"],
            }
        )
    rows.append({"name": "bare bot (again)", "workers": 1, "steps_per_s": None})
    rows[-1]["steady_steps_per_s"] = bare_bot(level, args.bare_steps, seed=1)

    print(f"{level}, {args.episodes} episodes per run, {os.cpu_count()} cores")
    print(f"{'run':<32}{'workers':>8}{'e2e steps/s':>13}{'steady steps/s':>16}{'startup s':>11}")
    for r in rows:
        e2e = f"{r['steps_per_s']:.0f}" if r["steps_per_s"] else "-"
        start = f"{r['startup_s']:.1f}" if "startup_s" in r else "-"
        print(
            f"{r['name']:<32}{r['workers']:>8}{e2e:>13}{r['steady_steps_per_s']:>16.0f}{start:>11}"
        )
    result = {
        "level": level,
        "episodes": args.episodes,
        "rows": rows,
        "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchrl": torchrl.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    path = Path(args.json or f"bench_results/demos_{level}_{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
