"""Benchmarks of the MoP core (SPEC section 6), importable so that a CLI can run them.

* :func:`run_step_benchmark`: policy steps/s in step mode (what collectors call, inference under
  ``torch.no_grad()`` in eval mode) for each MoP implementation (fused, reference, packed) and
  a ``GRUModule`` of comparable size: eager, compiled (``torch.compile``), and on CUDA replayed
  as CUDA graphs (eager and compiled).
* :func:`run_collector_benchmark`: collector frames/s on a BabyAI level with a random, a GRU
  and MoP policies, beside env-only steps/s, so the policy's share of the time is visible
  (env frames/s and policy steps/s are different things, as Sample Factory reports them); the
  policy can run on a GPU with the envs on CPU, also as TorchRL's ``cudagraph_policy`` /
  ``compile_policy``.
* :func:`run_sequence_benchmark`: recurrent-mode training throughput (forward + backward
  samples/s on ``[batch, steps]`` with ``is_init`` resets inside the sequences) for the same
  implementations, the ``GRUModule``'s ``"pad"`` and ``"scan"`` backends, and the fused MoP
  stepped one step at a time (step mode in a Python loop, with autograd).

Every JSON records the device (GPU name), the versions, the float32 matmul precision, and
which implementation ``"auto"`` picks on that device for a step and for a sequence.

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
from mop_torchrl.core.model import IMPLEMENTATIONS, resolve_implementation
from mop_torchrl.core.module import MoPModule

__all__ = [
    "cpu_model",
    "format_table",
    "main",
    "run_collector_benchmark",
    "run_sequence_benchmark",
    "run_step_benchmark",
]

STEP_BATCHES = (1, 16, 64, 256, 1024, 4096)
COMPILED = ("fused", "packed")
"""Implementations timed compiled and in CUDA graphs (the reference is the tests' oracle)."""


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
    implementations: Sequence[str] = IMPLEMENTATIONS,
    compiled: Sequence[str] = COMPILED,
    seed: int = 0,
) -> dict[str, Any]:
    """Benchmark 1: policy steps/s in step mode, per batch size.

    Candidates: ``mop_<implementation>`` for each of ``implementations``, and ``gru``
    (``GRUModule(input_dim, gru_hidden)``), each called as ``module(td)`` on a ``[batch]``
    TensorDict with random states and ~5% ``is_init``. With ``compile``,
    ``mop_<implementation>_compiled`` for those also in ``compiled``: ``torch.compile(module,
    fullgraph=True)`` (inductor; one compiled module per implementation for all batch sizes, so
    dynamo recompiles once with a dynamic batch size; the first call's time is in
    ``compile_s``). On CUDA with ``cuda_graphs``, ``..._graph`` replays the captured call of
    the eager (and ``..._compiled_graph`` of the compiled) ``module(td)``, and ``gru_graph`` the
    captured GRU step on tensors (``GRUModule``'s step calls ``is_init.any()``, a host sync
    that cannot be captured).
    """
    torch.manual_seed(seed)
    dev = torch.device(device)
    config = MoPConfig.from_preset(preset, input_dim=input_dim)
    mop = _mop_modules(config, dev, implementations).eval()
    gru = GRUModule(
        input_size=input_dim, hidden_size=gru_hidden, in_key="embed", out_key="features"
    )
    gru = gru.to(dev).eval()
    use_graphs = cuda_graphs and dev.type == "cuda"
    to_compile = [name for name in implementations if name in compiled] if compile else []
    compiled_modules = {
        name: torch.compile(mop[name], fullgraph=True, dynamic=None) for name in to_compile
    }
    rows, errors, compile_s = [], {}, {}
    for batch in batches:
        is_init = torch.rand(batch, 1, device=dev) < 0.05
        embed = torch.randn(batch, input_dim, device=dev)
        mop_td = next(iter(mop.values())).initial_state([batch], device=dev)
        mop_td = mop_td.apply(torch.randn_like).update({"embed": embed, "is_init": is_init})
        with torch.no_grad():  # outputs present from the start: one key set, one compile
            next(iter(mop.values()))(mop_td)
        gru_td = TensorDict(
            {
                "embed": embed,
                "is_init": is_init,
                "recurrent_state": torch.randn(batch, 1, gru_hidden, device=dev),
            },
            [batch],
        )
        candidates: dict[str, Callable[[], Any]] = {
            f"mop_{name}": _bind(module, mop_td.clone()) for name, module in mop.items()
        }
        candidates["gru"] = _bind(gru, gru_td.clone())
        graphed: dict[str, Callable[[], Any]] = {}
        for name, module in compiled_modules.items():
            call = _compiled_call(module, mop_td.clone())
            try:
                start = time.perf_counter()
                with torch.no_grad():
                    call()  # compiles here, not inside the timing
                _sync(dev)
                compile_s[f"mop_{name}_compiled@{batch}"] = time.perf_counter() - start
            except Exception as error:  # report, don't abort the other numbers
                errors[f"mop_{name}_compiled@{batch}"] = _first_line(error)
                continue
            candidates[f"mop_{name}_compiled"] = call
            if use_graphs:
                graphed[f"mop_{name}_compiled_graph"] = _compiled_call(module, mop_td.clone())
        if use_graphs:
            for name in compiled:
                if name in mop:
                    graphed[f"mop_{name}_graph"] = _bind(mop[name], mop_td.clone())
            graphed["gru_graph"] = _gru_step(gru, gru_td.clone())
            for name, fn in graphed.items():
                try:
                    candidates[name] = _cuda_graph(fn)
                except Exception as error:  # report, don't abort the other numbers
                    errors[f"{name}@{batch}"] = _first_line(error)
        with torch.no_grad():
            times = _measure(candidates, repeats, dev, min_time)
        rows += _rows(times, batch, baseline="gru", extra={"batch": batch})
    params = {"mop": _num_params(next(iter(mop.values()))), "gru": _num_params(gru)}
    result = _header("step", dev, config, params, repeats, gru_hidden=gru_hidden)
    result["config"].update(
        batches=list(batches),
        mode="eval, torch.no_grad()",
        is_init_p=0.05,
        compile=compile,
        implementations=list(implementations),
        compiled=to_compile,
        compile_options={"fullgraph": True, "dynamic": None, "mode": "default"},
        cuda_graphs=use_graphs,
    )
    result["results"] = rows
    if compile_s:
        result["compile_s"] = compile_s
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
    implementations: Sequence[str] = IMPLEMENTATIONS,
    step_loop: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Benchmark 2: recurrent-mode forward+backward samples/s on ``[batch, steps]``.

    ``is_init`` is true at ``t=0`` and with probability ``reset_prob`` at every other step
    (episode starts, zero stored state). Candidates: ``mop_<implementation>`` for each of
    ``implementations``, ``gru_pad``, ``gru_scan`` (``GRUModule`` backends) in recurrent mode,
    and (``step_loop``) ``mop_step_loop``: the fused MoP in step mode, one step at a time over
    ``steps``, with autograd (what training would cost without a recurrent mode). The loss is
    the mean square of the features; modules are in train mode (MoP expert dropout active).
    """
    torch.manual_seed(seed)
    dev = torch.device(device)
    config = MoPConfig.from_preset(preset, input_dim=input_dim)
    mop = _mop_modules(config, dev, ("fused", *implementations)).train()
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
    candidates = {f"mop_{name}": _train_step(mop[name], mop_td) for name in implementations}
    candidates["gru_pad"] = _train_step(grus["pad"], gru_td)
    candidates["gru_scan"] = _train_step(grus["scan"], gru_td)
    if step_loop:
        candidates["mop_step_loop"] = _train_step_loop(mop["fused"], mop_td)
    times = _measure(candidates, repeats, dev, min_time)
    best_gru = min(("gru_pad", "gru_scan"), key=lambda name: statistics.median(times[name]))
    rows = _rows(times, batch * steps, baseline=best_gru, extra={})
    loop = next((row for row in rows if row["candidate"] == "mop_step_loop"), None)
    for row in rows:
        row["speedup_vs_step_loop"] = loop["median_s"] / row["median_s"] if loop else None
    params = {"mop": _num_params(mop["fused"]), "gru": _num_params(grus["pad"])}
    result = _header("sequence", dev, config, params, repeats, gru_hidden=gru_hidden)
    result["config"].update(
        batch=batch,
        steps=steps,
        reset_prob=reset_prob,
        resets=int(is_init[:, 1:].sum()),
        mode="train, forward+backward of mean(features**2)",
        gru_baseline=best_gru,
        implementations=list(implementations),
    )
    result["results"] = rows
    return result


COLLECTOR_POLICIES = ("random", "gru", "mop")
"""Collector candidates by default; on CUDA also ``mop_packed`` and ``mop_packed_graph``."""


def run_collector_benchmark(
    level: str = "BabyAI-GoToLocal-v0",
    num_envs: int = 2,
    parallel: bool = True,
    frames: int = 2048,
    repeats: int = 3,
    preset: str = "seed",
    *,
    device: str = "cpu",
    policies: Sequence[str] | None = None,
    warmup: int = 1,
) -> dict[str, Any]:
    """Collector frames/s with a random, GRU(512) and MoP policies, and env-only steps/s.

    The envs run on CPU; the policies on ``device`` (``policy_device``; the random policy
    stays on CPU). Candidates (``policies``): ``random``, ``gru``, ``mop`` (implementation
    ``"auto"``), ``mop_<implementation>``, and with suffixes TorchRL's own wrappers:
    ``_compiled`` (``compile_policy``, inductor, ``allow_rnn`` set for dynamo) and/or then
    ``_graph`` (``cudagraph_policy=True``: the actor step, encoder to sampling, replayed as a
    CUDA graph; on CPU it runs eagerly), e.g. ``mop_packed_compiled_graph``. Each candidate gets its own env (a collector registers its
    policy's primer on the env it is given) and collector, ``warmup`` untimed batches (compiles
    and captures happen there), then ``repeats`` timed batches of ``frames`` frames.
    """
    from torchrl.collectors import Collector
    from torchrl.envs.utils import RandomPolicy

    from mop_torchrl.babyai.envs import make_babyai_env
    from mop_torchrl.babyai.policy import make_policy, policy_parts

    dev = torch.device(device)
    if policies is None:
        extra = ("mop_packed", "mop_packed_graph") if dev.type == "cuda" else ()
        policies = (*COLLECTOR_POLICIES, *extra)

    def make_env():
        return make_babyai_env(level, num_envs=num_envs, seed=0, parallel=parallel)

    def make_actor(name: str) -> tuple[torch.nn.Module | None, dict[str, Any]]:
        base = name.removesuffix("_graph").removesuffix("_compiled")
        options: dict[str, Any] = {}
        if name.endswith("_graph"):
            options["cudagraph_policy"] = True
        if name.removesuffix("_graph").endswith("_compiled"):
            options["compile_policy"] = {"warmup": 1}
        if base == "random":
            return None, options
        if base == "gru":
            actor, _ = make_policy("gru", gru_hidden_size=512)
        else:
            actor, _ = make_policy("mop", mop=MoPConfig.from_preset(preset))
            implementation = base.removeprefix("mop").lstrip("_") or "auto"
            policy_parts(actor).core.core.implementation = implementation
        return actor.to(dev).eval(), {**options, "policy_device": dev}

    times: dict[str, list[float]] = {"env_only": []}
    errors: dict[str, str] = {}
    env = make_env()
    env.rollout(8, break_when_any_done=False)
    for _ in range(repeats):
        start = time.perf_counter()
        env.rollout(frames // num_envs, break_when_any_done=False)
        times["env_only"].append(time.perf_counter() - start)
    env.close()
    params = {}
    for name in policies:
        actor, options = make_actor(name)
        if actor is not None:
            params[name] = _num_params(actor)
        env = make_env()
        collector = None
        try:
            with torch._dynamo.config.patch(allow_rnn=True):
                collector = Collector(
                    env,
                    actor or RandomPolicy(env.full_action_spec),
                    frames_per_batch=frames,
                    total_frames=(warmup + repeats) * frames,
                    auto_register_policy_transforms=True,
                    env_device="cpu",
                    storing_device="cpu",
                    **options,
                )
                batches = iter(collector)
                for _ in range(warmup):
                    next(batches)
                values = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    next(batches)
                    values.append(time.perf_counter() - start)
            times[name] = values
        except Exception as error:  # report, don't abort the other numbers
            errors[name] = _first_line(error)
        finally:
            if collector is not None:
                collector.shutdown()
            else:
                env.close()
    rows = []
    random = statistics.median(times["random"]) if times.get("random") else None
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
                "ratio_vs_random": random / median if random else None,
            }
        )
    header = _header(
        "collector",
        dev,
        MoPConfig.from_preset(preset),
        params,
        repeats,
        level=level,
        num_envs=num_envs,
        parallel=parallel,
        frames=frames,
        warmup=warmup,
        policies=list(policies),
        env_device="cpu",
    )
    result = {**header, "results": rows}
    if errors:
        result["errors"] = errors
    return result


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of a benchmark result."""
    title = (
        f"{result['benchmark']} benchmark on {result['device']} "
        f"(torch {result['versions']['torch']}, {result['threads']} threads)"
    )
    auto = result.get("auto")
    if auto:
        title += f"; auto: {auto['step']} (step), {auto['sequence']} (sequence)"
    if result["benchmark"] == "collector":
        head = f"{'candidate':<18} {'frames/s':>9} {'min-max ms':>17} {'x random':>9}"
        lines = [title, head, "-" * len(head)]
        for row in result["results"]:
            spread = f"{row['min_s'] * 1e3:.0f}-{row['max_s'] * 1e3:.0f}"
            ratio = row["ratio_vs_random"]
            lines.append(
                f"{row['candidate']:<18} {row['frames_per_s']:>9.0f} {spread:>17} "
                + (f"{ratio:>9.2f}" if ratio is not None else f"{'-':>9}")
            )
    else:
        step = result["benchmark"] == "step"
        head = f"{'batch':>6} " if step else ""
        head += f"{'candidate':<26} {'median ms':>10} {'min-max ms':>17} {'samples/s':>11}"
        head += f" {'x GRU time':>10}" + ("" if step else f" {'vs loop':>8}")
        lines = [title, head, "-" * len(head)]
        for row in result["results"]:
            line = f"{row['batch']:>6} " if step else ""
            spread = f"{row['min_s'] * 1e3:.3f}-{row['max_s'] * 1e3:.3f}"
            line += f"{row['candidate']:<26} {row['median_s'] * 1e3:>10.3f} {spread:>17}"
            line += f" {row['samples_per_s']:>11.0f} {row['ratio_vs_gru']:>10.2f}"
            if not step and row["speedup_vs_step_loop"] is not None:
                line += f" {row['speedup_vs_step_loop']:>7.1f}x"
            lines.append(line)
    for name, seconds in result.get("compile_s", {}).items():
        lines.append(f"compiled {name} in {seconds:.1f} s")
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
    parser.add_argument(
        "--implementations",
        default=",".join(IMPLEMENTATIONS),
        help="step, sequence: MoP implementations timed (comma-separated)",
    )
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="float32 matmuls on TF32 tensor cores (torch.set_float32_matmul_precision('high'))",
    )
    parser.add_argument("--batch", type=int, default=64, help="sequence")
    parser.add_argument("--steps", type=int, default=32, help="sequence")
    parser.add_argument("--reset_prob", type=float, default=0.05, help="sequence")
    parser.add_argument("--task_id", default="BabyAI-GoToLocal-v0", help="collector: level")
    parser.add_argument("--num_envs", type=int, default=2, help="collector: env workers")
    parser.add_argument(
        "--serial", action="store_true", help="collector: envs in one process (BabyAIBatchedEnv)"
    )
    parser.add_argument("--frames", type=int, default=2048, help="collector: frames timed")
    parser.add_argument(
        "--policies",
        default=None,
        help="collector: candidates, e.g. random,gru,mop,mop_packed,mop_packed_graph "
        "(default: the first three, and the packed ones on CUDA)",
    )
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
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    implementations = [name for name in args.implementations.split(",") if name]
    unknown = sorted(set(implementations) - set(IMPLEMENTATIONS))
    if unknown:
        parser.error(f"--implementations: unknown {unknown}; choose from {list(IMPLEMENTATIONS)}")
    which = ("step", "sequence", "collector") if args.benchmark == "all" else (args.benchmark,)
    common = {"device": args.device, "preset": args.mop_preset}
    if args.repeats is not None:
        common["repeats"] = args.repeats
    for name in which:
        if name == "step":
            batches = [int(b) for b in args.batches.split(",")]
            result = run_step_benchmark(
                batches,
                cuda_graphs=not args.no_cuda_graphs,
                compile=args.compile,
                implementations=implementations,
                **common,
            )
        elif name == "sequence":
            result = run_sequence_benchmark(
                args.batch,
                args.steps,
                reset_prob=args.reset_prob,
                implementations=implementations,
                **common,
            )
        else:
            result = run_collector_benchmark(
                args.task_id,
                args.num_envs,
                parallel=not args.serial,
                frames=args.frames,
                repeats=common.get("repeats", 3),
                preset=args.mop_preset,
                device=args.device,
                policies=args.policies.split(",") if args.policies else None,
            )
        out = Path(args.out if args.out and len(which) == 1 else Path(args.out_dir, f"{name}.json"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(format_table(result))
        print(f"wrote {out}\n")
    return 0


# --------------------------------------------------------------------------- helpers
def _mop_modules(
    config: MoPConfig, device: torch.device, implementations: Sequence[str]
) -> torch.nn.ModuleDict:
    """One MoP module per implementation, all with the same weights."""
    mop = torch.nn.ModuleDict(
        {
            name: MoPModule(config, in_key="embed", implementation=name)
            for name in dict.fromkeys(implementations)
        }
    ).to(device)
    first = next(iter(mop.values()))
    for module in mop.values():
        module.load_state_dict(first.state_dict())
    return mop


def _bind(module: torch.nn.Module, td: TensorDictBase) -> Callable[[], Any]:
    return lambda: module(td)


def _compiled_call(compiled: Callable[..., Any], td: TensorDictBase) -> Callable[[], Any]:
    """``compiled(td)`` for a ``torch.compile``-d module; dynamo refuses ``nn.GRU`` modules
    unless ``allow_rnn`` (set per call: a recompile outside the setting would fail)."""

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


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


def cpu_model() -> str:
    """The CPU's model name: ``/proc/cpuinfo``'s on Linux, else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [line for line in cpuinfo.read_text().splitlines() if "model name" in line]
        if models:
            return models[0].split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


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
        device_name = cpu_model()
    versions = {
        "torch": torch.__version__,
        "torchrl": torchrl.__version__,
        "tensordict": tensordict.__version__,
        "mop_torchrl": mop_torchrl.__version__,
        "python": platform.python_version(),
    }
    precision = {"float32_matmul": torch.get_float32_matmul_precision()}
    if device.type == "cuda":
        versions.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        versions["triton"] = _version_of("triton")
        major, minor = torch.cuda.get_device_capability(device)
        device_name += f" (sm_{major}{minor})"
        precision["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
    return {
        "benchmark": name,
        "device": f"{device.type}: {device_name}",
        "threads": torch.get_num_threads(),
        "versions": versions,
        "precision": precision,
        # What MoPModule(implementation="auto") runs on this device (core.model).
        "auto": {
            mode: resolve_implementation("auto", device, mode == "sequence")
            for mode in ("step", "sequence")
        },
        "config": {"mop": config.to_dict(), "repeats": repeats, **extra},
        "params": params,
    }


def _version_of(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
