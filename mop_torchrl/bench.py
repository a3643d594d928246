"""Benchmarks of the MoP core (SPEC section 6), importable so that a CLI can run them.

* :func:`run_step_benchmark`: policy steps/s in step mode (what collectors call, inference under
  ``torch.no_grad()`` in eval mode) for the fused and the reference MoP and a
  ``GRUModule`` of comparable size; on CUDA also replayed as CUDA graphs.
* :func:`run_collector_benchmark`: collector frames/s on a BabyAI level with a random, a GRU
  and a MoP policy, beside env-only steps/s, so the policy's share of the time is visible
  (env frames/s and policy steps/s are different things, as Sample Factory reports them).
* :func:`run_sequence_benchmark`: recurrent-mode training throughput (forward + backward
  samples/s on ``[batch, steps]`` with ``is_init`` resets inside the sequences) for the same
  candidates, the ``GRUModule``'s ``"pad"`` and ``"scan"`` backends, and the fused MoP stepped
  one step at a time (step mode in a Python loop, with autograd).

Machines are shared and noisy, so candidates are timed side by side and interleaved in one
process (each repeat times every candidate once), and the JSON keeps the median and the spread
over repeats; compare ratios within a run, absolute numbers only on a dedicated GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tensordict
import torch
import torchrl
from tensordict import TensorDict, TensorDictBase
from torchrl.envs.utils import step_mdp
from torchrl.modules import GRUModule, set_recurrent_mode

import mop_torchrl
from mop_torchrl.core.config import MoPConfig
from mop_torchrl.core.module import MoPModule

__all__ = [
    "format_table",
    "main",
    "run_collector_benchmark",
    "run_sequence_benchmark",
    "run_step_benchmark",
]

STEP_BATCHES = (1, 16, 64, 256, 1024, 4096)


def run_step_benchmark(
    batches: Sequence[int] = STEP_BATCHES,
    *,
    repeats: int = 7,
    device: str = "cpu",
    preset: str = "seed",
    input_dim: int = 128,
    gru_hidden: int = 512,
    min_time: float = 0.05,
    cuda_graphs: bool = True,
    compile: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Benchmark 1: policy steps/s in step mode, per batch size.

    Candidates: ``mop_fused``, ``mop_reference``, ``gru`` (``GRUModule(input_dim,
    gru_hidden)``), each called as ``module(td)`` on a ``[batch]`` TensorDict with random states
    and ~5% ``is_init``. On CUDA with ``cuda_graphs``, ``mop_fused_graph`` replays the captured
    ``module(td)``, and ``gru_graph`` the captured GRU step on tensors (``GRUModule``'s step
    calls ``is_init.any()``, a host sync that cannot be captured). With ``compile``,
    ``mop_fused_compiled`` is ``torch.compile(module)`` (inductor, one graph per batch size).
    """
    torch.manual_seed(seed)
    dev = torch.device(device)
    config = MoPConfig.from_preset(preset, input_dim=input_dim)
    mop = _mop_pair(config, dev).eval()
    gru = GRUModule(
        input_size=input_dim, hidden_size=gru_hidden, in_key="embed", out_key="features"
    )
    gru = gru.to(dev).eval()
    use_graphs = cuda_graphs and dev.type == "cuda"
    rows, errors = [], {}
    for batch in batches:
        is_init = torch.rand(batch, 1, device=dev) < 0.05
        embed = torch.randn(batch, input_dim, device=dev)
        mop_td = mop["fused"].initial_state([batch], device=dev).apply(torch.randn_like)
        mop_td.update({"embed": embed, "is_init": is_init})
        gru_td = TensorDict(
            {
                "embed": embed,
                "is_init": is_init,
                "recurrent_state": torch.randn(batch, 1, gru_hidden, device=dev),
            },
            [batch],
        )
        candidates: dict[str, Callable[[], Any]] = {
            "mop_fused": _bind(mop["fused"], mop_td.clone()),
            "mop_reference": _bind(mop["reference"], mop_td.clone()),
            "gru": _bind(gru, gru_td.clone()),
        }
        if compile:
            compiled = _compiled_call(mop["fused"], mop_td.clone())
            with torch.no_grad():
                compiled()  # compiles here, not inside the timing
            candidates["mop_fused_compiled"] = compiled
        if use_graphs:
            graphed = {
                "mop_fused_graph": _bind(mop["fused"], mop_td.clone()),
                "gru_graph": _gru_step(gru, gru_td.clone()),
            }
            for name, fn in graphed.items():
                try:
                    candidates[name] = _cuda_graph(fn)
                except RuntimeError as error:  # report, don't abort the other numbers
                    errors[f"{name}@{batch}"] = str(error).splitlines()[0]
        with torch.no_grad():
            times = _measure(candidates, repeats, dev, min_time)
        rows += _rows(times, batch, baseline="gru", extra={"batch": batch})
    params = {"mop": _num_params(mop["fused"]), "gru": _num_params(gru)}
    result = _header("step", dev, config, params, repeats, gru_hidden=gru_hidden)
    result["config"].update(
        batches=list(batches), mode="eval, torch.no_grad()", is_init_p=0.05, compile=compile
    )
    result["results"] = rows
    if errors:
        result["errors"] = errors
    return result


def run_sequence_benchmark(
    batch: int = 64,
    steps: int = 32,
    *,
    reset_prob: float = 0.05,
    repeats: int = 5,
    device: str = "cpu",
    preset: str = "seed",
    input_dim: int = 128,
    gru_hidden: int = 512,
    min_time: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """Benchmark 2: recurrent-mode forward+backward samples/s on ``[batch, steps]``.

    ``is_init`` is true at ``t=0`` and with probability ``reset_prob`` at every other step
    (episode starts, zero stored state). Candidates: ``mop_fused``, ``mop_reference``,
    ``gru_pad``, ``gru_scan`` (``GRUModule`` backends) in recurrent mode, and
    ``mop_step_loop``: the fused MoP in step mode, one step at a time over ``steps``, with
    autograd (what training would cost without a recurrent mode). The loss is the mean square
    of the features; modules are in train mode (MoP expert dropout active).
    """
    torch.manual_seed(seed)
    dev = torch.device(device)
    config = MoPConfig.from_preset(preset, input_dim=input_dim)
    mop = _mop_pair(config, dev).train()
    grus = {
        backend: GRUModule(
            input_size=input_dim,
            hidden_size=gru_hidden,
            in_key="embed",
            out_key="features",
            recurrent_backend=backend,
        ).to(dev)
        for backend in ("pad", "scan")
    }
    grus["scan"].load_state_dict(grus["pad"].state_dict())
    is_init = torch.rand(batch, steps, 1, device=dev) < reset_prob
    is_init[:, 0] = True
    embed = torch.randn(batch, steps, input_dim, device=dev)
    mop_td = mop["fused"].initial_state([batch, steps], device=dev)
    mop_td.update({"embed": embed, "is_init": is_init})
    gru_td = TensorDict(
        {
            "embed": embed,
            "is_init": is_init,
            "recurrent_state": torch.zeros(batch, steps, 1, gru_hidden, device=dev),
        },
        [batch, steps],
    )
    candidates = {
        "mop_fused": _train_step(mop["fused"], mop_td),
        "mop_reference": _train_step(mop["reference"], mop_td),
        "gru_pad": _train_step(grus["pad"], gru_td),
        "gru_scan": _train_step(grus["scan"], gru_td),
        "mop_step_loop": _train_step_loop(mop["fused"], mop_td),
    }
    times = _measure(candidates, repeats, dev, min_time)
    best_gru = min(("gru_pad", "gru_scan"), key=lambda name: statistics.median(times[name]))
    rows = _rows(times, batch * steps, baseline=best_gru, extra={})
    loop = next(row for row in rows if row["candidate"] == "mop_step_loop")
    for row in rows:
        row["speedup_vs_step_loop"] = loop["median_s"] / row["median_s"]
    params = {"mop": _num_params(mop["fused"]), "gru": _num_params(grus["pad"])}
    result = _header("sequence", dev, config, params, repeats, gru_hidden=gru_hidden)
    result["config"].update(
        batch=batch,
        steps=steps,
        reset_prob=reset_prob,
        resets=int(is_init[:, 1:].sum()),
        mode="train, forward+backward of mean(features**2)",
        gru_baseline=best_gru,
    )
    result["results"] = rows
    return result


def run_collector_benchmark(
    level: str = "BabyAI-GoToLocal-v0",
    num_envs: int = 2,
    parallel: bool = True,
    frames: int = 2048,
    repeats: int = 3,
    preset: str = "seed",
) -> dict[str, Any]:
    """Collector frames/s with a random, GRU(512) and MoP policy, and env-only steps/s.

    Each candidate gets a fresh env per repeat (a collector registers its policy's primer on
    the env it is given) and one warm-up batch; the timed batch is ``frames`` frames.
    """
    from torchrl.collectors import Collector
    from torchrl.envs.utils import RandomPolicy

    from mop_torchrl.babyai.envs import make_babyai_env
    from mop_torchrl.babyai.policy import make_policy

    def make_env():
        return make_babyai_env(level, num_envs=num_envs, seed=0, parallel=parallel)

    mop_actor, _ = make_policy("mop", mop=MoPConfig.from_preset(preset))
    gru_actor, _ = make_policy("gru", gru_hidden_size=512)
    policies = {"random": None, "gru": gru_actor.eval(), "mop": mop_actor.eval()}
    times: dict[str, list[float]] = {"env_only": [], **{name: [] for name in policies}}
    for _ in range(repeats):
        env = make_env()
        env.rollout(8, break_when_any_done=False)
        start = time.perf_counter()
        env.rollout(frames // num_envs, break_when_any_done=False)
        times["env_only"].append(time.perf_counter() - start)
        env.close()
        for name, policy in policies.items():
            env = make_env()
            collector = Collector(
                env,
                policy or RandomPolicy(env.full_action_spec),
                frames_per_batch=frames,
                total_frames=2 * frames,
                auto_register_policy_transforms=True,
            )
            batches = iter(collector)
            next(batches)
            start = time.perf_counter()
            next(batches)
            times[name].append(time.perf_counter() - start)
            collector.shutdown()
    rows = []
    random = statistics.median(times["random"])
    for name, values in times.items():
        median = statistics.median(values)
        rows.append(
            {
                "candidate": name,
                "median_s": median,
                "min_s": min(values),
                "max_s": max(values),
                "repeats_s": values,
                "frames_per_s": frames / median,
                "ratio_vs_random": random / median,
            }
        )
    device = torch.device("cpu")
    params = {"mop": _num_params(mop_actor), "gru": _num_params(gru_actor)}
    header = _header(
        "collector",
        device,
        MoPConfig.from_preset(preset),
        params,
        repeats,
        level=level,
        num_envs=num_envs,
        parallel=parallel,
        frames=frames,
    )
    return {**header, "results": rows}


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of a benchmark result."""
    title = (
        f"{result['benchmark']} benchmark on {result['device']} "
        f"(torch {result['versions']['torch']}, {result['threads']} threads)"
    )
    if result["benchmark"] == "collector":
        head = f"{'candidate':<10} {'frames/s':>9} {'min-max ms':>17} {'x random':>9}"
        lines = [title, head, "-" * len(head)]
        for row in result["results"]:
            spread = f"{row['min_s'] * 1e3:.0f}-{row['max_s'] * 1e3:.0f}"
            lines.append(
                f"{row['candidate']:<10} {row['frames_per_s']:>9.0f} {spread:>17} "
                f"{row['ratio_vs_random']:>9.2f}"
            )
        return "\n".join(lines)
    step = result["benchmark"] == "step"
    head = f"{'batch':>6} " if step else ""
    head += f"{'candidate':<16} {'median ms':>10} {'min-max ms':>17} {'samples/s':>11}"
    head += f" {'x GRU time':>10}" + ("" if step else f" {'vs loop':>8}")
    lines = [title, head, "-" * len(head)]
    for row in result["results"]:
        line = f"{row['batch']:>6} " if step else ""
        spread = f"{row['min_s'] * 1e3:.3f}-{row['max_s'] * 1e3:.3f}"
        line += f"{row['candidate']:<16} {row['median_s'] * 1e3:>10.3f} {spread:>17}"
        line += f" {row['samples_per_s']:>11.0f} {row['ratio_vs_gru']:>10.2f}"
        if not step:
            line += f" {row['speedup_vs_step_loop']:>7.1f}x"
        lines.append(line)
    for name, error in result.get("errors", {}).items():
        lines.append(f"{name}: {error}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``step`` / ``sequence`` / ``all``: run benchmarks, print tables, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "benchmark", choices=("step", "sequence", "collector", "all"), nargs="?", default="all"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--mop_preset", default="seed", help="MoP preset of the cores timed")
    parser.add_argument("--batches", default=",".join(map(str, STEP_BATCHES)), help="step")
    parser.add_argument("--no_cuda_graphs", action="store_true", help="step")
    parser.add_argument("--compile", action="store_true", help="step: add torch.compile")
    parser.add_argument("--batch", type=int, default=64, help="sequence")
    parser.add_argument("--steps", type=int, default=32, help="sequence")
    parser.add_argument("--reset_prob", type=float, default=0.05, help="sequence")
    parser.add_argument("--task_id", default="BabyAI-GoToLocal-v0", help="collector: level")
    parser.add_argument("--num_envs", type=int, default=2, help="collector: env workers")
    parser.add_argument("--serial", action="store_true", help="collector: SerialEnv")
    parser.add_argument("--frames", type=int, default=2048, help="collector: frames timed")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out_dir", default="bench_results")
    parser.add_argument("--out", default=None, help="JSON path (one benchmark only)")
    # Earlier spellings, accepted but not listed: one style (underscores) in --help.
    for old, dest, kwargs in (
        ("--preset", "mop_preset", {}),
        ("--no-cuda-graphs", "no_cuda_graphs", {"action": "store_true"}),
        ("--reset-prob", "reset_prob", {"type": float}),
        ("--level", "task_id", {}),
        ("--num-envs", "num_envs", {"type": int}),
        ("--out-dir", "out_dir", {}),
    ):
        parser.add_argument(old, dest=dest, help=argparse.SUPPRESS, **kwargs)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    which = ("step", "sequence", "collector") if args.benchmark == "all" else (args.benchmark,)
    common = {"device": args.device, "preset": args.mop_preset}
    if args.repeats is not None:
        common["repeats"] = args.repeats
    for name in which:
        if name == "step":
            batches = [int(b) for b in args.batches.split(",")]
            result = run_step_benchmark(
                batches, cuda_graphs=not args.no_cuda_graphs, compile=args.compile, **common
            )
        elif name == "sequence":
            result = run_sequence_benchmark(
                args.batch, args.steps, reset_prob=args.reset_prob, **common
            )
        else:
            result = run_collector_benchmark(
                args.task_id,
                args.num_envs,
                parallel=not args.serial,
                frames=args.frames,
                repeats=common.get("repeats", 3),
                preset=args.mop_preset,
            )
        out = Path(args.out if args.out and len(which) == 1 else Path(args.out_dir, f"{name}.json"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(format_table(result))
        print(f"wrote {out}\n")
    return 0


# --------------------------------------------------------------------------- helpers
def _mop_pair(config: MoPConfig, device: torch.device) -> torch.nn.ModuleDict:
    """The fused and the reference MoP core with the same weights."""
    mop = torch.nn.ModuleDict(
        {
            impl: MoPModule(config, in_key="embed", implementation=impl)
            for impl in ("fused", "reference")
        }
    ).to(device)
    mop["reference"].load_state_dict(mop["fused"].state_dict())
    return mop


def _bind(module: torch.nn.Module, td: TensorDictBase) -> Callable[[], Any]:
    return lambda: module(td)


def _compiled_call(module: torch.nn.Module, td: TensorDictBase) -> Callable[[], Any]:
    """``torch.compile(module)(td)``; dynamo refuses ``nn.GRU`` modules unless ``allow_rnn``
    (set per call: a recompile outside the setting would fail)."""
    compiled = torch.compile(module, dynamic=False, fullgraph=True)

    def call():
        with torch._dynamo.config.patch(allow_rnn=True):
            return compiled(td)

    return call


def _gru_step(gru: GRUModule, td: TensorDictBase) -> Callable[[], Any]:
    """``GRUModule``'s step on tensors, without its ``is_init.any()`` host sync."""
    x, is_init, hidden = td["embed"], td["is_init"], td["recurrent_state"]

    def step():
        h0 = torch.where(is_init.unsqueeze(-1), 0.0, hidden).transpose(0, 1)
        return gru.gru(x.unsqueeze(1), h0.contiguous())

    return step


def _cuda_graph(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Captures ``fn`` (after warm-up on a side stream) and returns the graph's replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        fn()
    return graph.replay


def _train_step(module: torch.nn.Module, td: TensorDictBase) -> Callable[[], None]:
    def step():
        module.zero_grad(set_to_none=True)
        with set_recurrent_mode(True):
            out = module(td.clone(False))
        out["features"].pow(2).mean().backward()

    return step


def _train_step_loop(module: MoPModule, td: TensorDictBase) -> Callable[[], None]:
    """Step mode over time with autograd, carrying the state like a collector would: the
    states the module wrote under ``"next"`` become the next step's inputs (``step_mdp``)."""

    def step():
        module.zero_grad(set_to_none=True)
        features, carried = [], None
        for t in range(td.shape[1]):
            step_td = td[:, t]
            if carried is not None:
                step_td.update(carried)
            module(step_td)
            features.append(step_td["features"])
            carried = step_mdp(step_td, keep_other=False)
        torch.stack(features, 1).pow(2).mean().backward()

    return step


def _measure(
    candidates: dict[str, Callable[[], Any]], repeats: int, device: torch.device, min_time: float
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, ``repeats`` times, interleaved."""
    iters = {}
    for name, fn in candidates.items():
        fn()  # warm-up (lazy init, allocator, oneDNN primitives)
        single = _time(fn, 1, device)
        iters[name] = max(1, math.ceil(min_time / max(single, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            times[name].append(_time(fn, iters[name], device))
    return times


def _time(fn: Callable[[], Any], iters: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def _rows(
    times: dict[str, list[float]], samples: int, baseline: str, extra: dict
) -> list[dict[str, Any]]:
    base = statistics.median(times[baseline])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [median] * 3
        rows.append(
            {
                **extra,
                "candidate": name,
                "median_s": median,
                "min_s": min(values),
                "max_s": max(values),
                "iqr_s": quartiles[2] - quartiles[0],
                "repeats_s": values,
                "samples_per_s": samples / median,
                "ratio_vs_gru": median / base,
            }
        )
    return rows


def _num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _header(
    name: str,
    device: torch.device,
    config: MoPConfig,
    params: dict[str, int],
    repeats: int,
    **extra: Any,
) -> dict[str, Any]:
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            models = [line for line in cpuinfo.read_text().splitlines() if "model name" in line]
            device_name = models[0].split(":", 1)[1].strip() if models else device_name
    return {
        "benchmark": name,
        "device": f"{device.type}: {device_name}",
        "threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "torchrl": torchrl.__version__,
            "tensordict": tensordict.__version__,
            "mop_torchrl": mop_torchrl.__version__,
            "python": platform.python_version(),
        },
        "config": {"mop": config.to_dict(), "repeats": repeats, **extra},
        "params": params,
    }
