"""Learning benchmark beyond BabyAI: MoP vs GRU vs LSTM on masked CartPole and masked Pendulum.

    python benchmarks/classic_pomdp.py --out bench_results/classic_pomdp      # run (resumable)
    python benchmarks/classic_pomdp.py --out bench_results/classic_pomdp --jobs 15 --budget_s 450
    python benchmarks/classic_pomdp.py --out bench_results/classic_pomdp --collect

Runs ``examples/recurrent_ppo.py`` (the RL Zoo's recurrent PPO in TorchRL) on masked CartPole
(``cartpole``) and masked Pendulum (``pendulum``), and ``examples/recurrent_dqn.py`` (R2D2's
recipe, small) on masked CartPole (``cartpole_dqn``), for every core (``--cores``: ``mop``,
``gru``, ``lstm`` with the example's default critic, or ``ACTOR+CRITIC`` such as ``mop+gru``,
the PPO recipes' ``--critic_core``) and seed, each with the example's own defaults unless
``--{task}_frames`` is given. ``--jobs`` processes run at a time, one torch thread each (with
one job seed by seed, so a cut-short benchmark still has every core on the finished seeds; with
more, the longest runs first: Pendulum, the DQN, then CartPole, MoP first in each). A run whose
JSON exists is skipped; each run's output goes to ``{task}_{core}_s{seed}.log``.
``--max_wall_s`` makes every run stop early (and save its curve) after that many seconds,
``--budget_s`` bounds the whole benchmark, ``--stop_at_target`` stops a run once its rolling
mean reaches the task's target (all the table needs), ``--mop_layers`` gives the MoP cores other
expert sizes (write those runs to their own ``--out``). Each run's wall time and CPU time are
recorded (on a shared machine the CPU time is the comparable one). ``--collect`` writes
``summary.json``, prints a markdown table (final return, frames to reach the target, frames/s,
MoP routing per block) and plots return vs frames (mean and range over seeds) to ``--figure``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from subprocess import STDOUT, Popen
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# The examples' own rolling mean: the table counts frames to target the way the runs stop.
sys.path.insert(0, str(ROOT / "examples"))
from masked_control import frames_to_return, rolling_returns  # noqa: E402

CORES = ("mop", "gru", "lstm")
# What --cores takes: an actor's kind (the recipe's default critic), or the actor's and the
# critic's (PPO only; ``mop+mop`` overrides a MoP actor's default LSTM critic).
CORE_SPECS = CORES + tuple(f"{a}+{c}" for a in CORES for c in CORES)
# An example's imports, env set-up and saving, outside its own --max_wall_s clock.
START_MARGIN_S = 45.0
TASKS = {
    # name: (script and its task flags, target return, rolling window in episodes)
    "cartpole": (["recurrent_ppo.py", "--env", "cartpole"], 475.0, 100),
    "pendulum": (["recurrent_ppo.py", "--env", "pendulum"], -250.0, 20),
    "cartpole_dqn": (["recurrent_dqn.py"], 450.0, 100),
}
# The tasks by CPU per run at their defaults, most first (2-core EPYC, the records in
# docs/results/classic_pomdp/: Pendulum 160-790 s, the DQN 180-560 s, CartPole 110-300 s).
# On 16 cores the 18 default runs started MoP first and then seed by seed, so two Pendulum
# baselines waited 200-230 s for a process and missed the 540 s budget.
LONGEST_FIRST = ("pendulum", "cartpole_dqn", "cartpole")


@dataclass
class Run:
    task: str
    core: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.task}_{spec_name(self.core)}_s{self.seed}"


def spec_name(spec: str) -> str:
    """``mop+gru`` -> ``mop_critic_gru``, as the records of a run with a critic of its own."""
    return spec.replace("+", "_critic_")


def pending_runs(
    out: Path, tasks: list[str], seeds: list[int], jobs: int, cores: tuple[str, ...] = CORES
) -> list[Run]:
    """Runs without a JSON yet, seed by seed (a cut-short benchmark still has every core on the
    finished seeds); with ``jobs > 1`` the longest go first (``LONGEST_FIRST``, the MoP runs
    first within a task), so that the runs left waiting for a free process are the short
    ones."""
    runs = [
        Run(task, core, seed)
        for seed in seeds
        for task in tasks
        for core in cores
        if not (out / f"{task}_{spec_name(core)}_s{seed}.json").exists()
    ]
    if jobs > 1:
        runs.sort(key=lambda run: (LONGEST_FIRST.index(run.task), "mop" not in run.core))
    return runs


def start(
    run: Run,
    out: Path,
    frames: dict[str, int | None],
    max_wall_s: float | None,
    stop_at_target: bool = False,
    mop_layers: str | None = None,
) -> Popen:
    """Starts one example process, its output in ``{name}.log``, one torch thread; with
    ``stop_at_target`` it stops once its rolling mean reaches the task's target; ``mop_layers``
    sets the MoP cores' expert sizes (the example's ``--mop_layers``)."""
    script, *task_args = TASKS[run.task][0]
    cmd = [sys.executable, str(ROOT / "examples" / script), *task_args]
    actor, _, critic = run.core.partition("+")
    cmd += ["--core", actor, *(["--critic_core", critic] if critic else [])]
    cmd += ["--seed", str(run.seed), "--out", str(out / f"{run.name}.json")]
    if frames.get(run.task) is not None:
        cmd += ["--frames", str(frames[run.task])]
    if max_wall_s is not None:
        cmd += ["--max_wall_s", str(max_wall_s)]
    if stop_at_target:
        _, target, window = TASKS[run.task]
        cmd += ["--stop_return", str(target), "--stop_window", str(window)]
    if mop_layers is not None and "mop" in run.core:
        cmd += ["--mop_layers", mop_layers]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(out / f"{run.name}.log", "w") as log:
        return Popen(cmd, stdout=log, stderr=STDOUT, env=env)


def finish(run: Run, out: Path, status: int, usage: Any, wall_s: float) -> None:
    """Adds the process's wall and CPU time to the run's JSON and prints a line."""
    path = out / f"{run.name}.json"
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not path.exists():
        print(f"{run.task:8} {run.core:4} seed {run.seed}: FAILED ({code}), see {run.name}.log")
        return
    record = json.loads(path.read_text())
    record["process_wall_s"] = wall_s
    record["process_cpu_s"] = usage.ru_utime + usage.ru_stime
    path.write_text(json.dumps(record))
    print(
        f"{run.task:8} {run.core:4} seed {run.seed}: {record['frames']} frames, "
        f"wall {wall_s:.0f} s, cpu {record['process_cpu_s']:.0f} s",
        flush=True,
    )


def run_all(
    out: Path,
    tasks: list[str],
    seeds: list[int],
    frames: dict[str, int | None],
    jobs: int = 1,
    max_wall_s: float | None = None,
    budget_s: float | None = None,
    cores: tuple[str, ...] = CORES,
    stop_at_target: bool = False,
    mop_layers: str | None = None,
) -> None:
    """Runs every missing (task, core, seed), up to ``jobs`` processes at a time.

    ``budget_s`` bounds the whole benchmark's wall time: a run started late gets what is left
    of it (less ``START_MARGIN_S``) as its own ``max_wall_s``, and none starts with under a
    minute left."""
    out.mkdir(parents=True, exist_ok=True)
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    queue = pending_runs(out, tasks, seeds, jobs, cores)
    running: dict[int, tuple[Run, Popen, float]] = {}
    while queue or running:
        while queue and len(running) < jobs:
            limit = max_wall_s
            if deadline is not None:
                left = deadline - time.perf_counter() - START_MARGIN_S
                if left < 60:
                    print(f"budget spent: {len(queue)} runs not started", flush=True)
                    queue.clear()
                    break
                limit = left if limit is None else min(limit, left)
            run = queue.pop(0)
            proc = start(run, out, frames, limit, stop_at_target, mop_layers)
            running[proc.pid] = (run, proc, time.perf_counter())
        if not running:
            break
        # wait4: the finished child's own rusage (RUSAGE_CHILDREN would mix concurrent runs)
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        run, proc, started = running.pop(pid)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        finish(run, out, status, usage, time.perf_counter() - started)


def core_label(core: str, critic: str | None) -> str:
    """How the table and the figure name a ``--cores`` entry: the actor, and the critic where
    it is another kind (``gru + lstm critic``)."""
    actor = core.partition("+")[0]
    return actor if critic in (None, actor) else f"{actor} + {critic} critic"


def load_runs(out: Path, task: str, core: str) -> list[dict]:
    """The records of one task and ``--cores`` entry, seed by seed."""
    return [
        json.loads(p.read_text()) for p in sorted(out.glob(f"{task}_{spec_name(core)}_s*.json"))
    ]


def summarise(out: Path) -> dict:
    summary: dict = {}
    for task, (_, target, window) in TASKS.items():
        for core in CORE_SPECS:
            runs = load_runs(out, task, core)
            if not runs:
                continue
            finals, reach = [], []
            for run in runs:
                _, mean = rolling_returns(run["curve"], window)
                finals.append(float(mean[-1]) if len(mean) else float("nan"))
                reach.append(frames_to_return(run["curve"], target, window))
            summary[f"{task}/{core}"] = {
                "task": task,
                "core": core,
                "critic_core": runs[0].get("critic_core"),  # the DQN has none
                "seeds": [r["seed"] for r in runs],
                "frames": [r["frames"] for r in runs],
                "params": runs[0]["params"],
                "final_return": finals,
                "target": target,
                "window": window,
                "frames_to_target": reach,
                "wall_s": [r.get("process_wall_s", r["wall_s"]) for r in runs],
                "cpu_s": [r.get("process_cpu_s") for r in runs],
                "routing": [r["routing"] for r in runs] if core.startswith("mop") else None,
            }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def table(summary: dict) -> str:
    rows = [
        "| task | core | params | seeds | frames | final return (mean of seeds; each) "
        "| frames to target | wall s (mean) | CPU s (mean) | frames/s (mean) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary.values():
        each = ", ".join(f"{r:.0f}" for r in s["final_return"])
        reach = ", ".join("—" if r is None else f"{r:,.0f}" for r in s["frames_to_target"])
        cpu = [c for c in s["cpu_s"] if c is not None]
        fps = np.mean([f / w for f, w in zip(s["frames"], s["wall_s"])])
        label = core_label(s["core"], s.get("critic_core"))
        rows.append(
            f"| {s['task']} | {label} | {s['params']:,} | {len(s['seeds'])} "
            f"| {s['frames'][0]:,} | {np.mean(s['final_return']):.0f} ({each}) | {reach} "
            f"| {np.mean(s['wall_s']):.0f} | {np.mean(cpu) if cpu else float('nan'):.0f} "
            f"| {fps:.0f} |"
        )
    for s in summary.values():
        if s["routing"]:
            blocks = np.mean(np.array(s["routing"], dtype=float), axis=0)
            text = "; ".join(
                f"block {b}: " + "/".join(f"{w:.2f}" for w in weights)
                for b, weights in enumerate(blocks)
            )
            rows.append(
                f"\nMoP routing on {s['task']}, {s['core']} "
                f"(mean weight of each expert, in block order): {text}"
            )
    return "\n".join(rows)


def plot(out: Path, figure: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(load_runs(out, t, c) for c in CORE_SPECS)]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        _, target, window = TASKS[task]
        for core in CORE_SPECS:
            runs = [
                run for run in load_runs(out, task, core) if run["curve"]
            ]  # a cut-short run may have no episode
            if not runs:
                continue
            rolled = [rolling_returns(run["curve"], window) for run in runs]
            start = max(frames[0] for frames, _ in rolled)  # every seed has an episode
            # to the longest run: a seed that stopped (at its target) holds its last value
            grid = np.linspace(start, max(r["frames"] for r in runs), 100)
            curves = np.array([np.interp(grid, frames, mean) for frames, mean in rolled])
            (line,) = ax.plot(
                grid,
                curves.mean(0),
                color=f"C{CORE_SPECS.index(core)}",
                label=f"{core_label(core, runs[0].get('critic_core'))} ({len(runs)} seeds)",
            )
            ax.fill_between(grid, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.2)
        ax.axhline(target, color="grey", ls="--", lw=0.8)
        ax.set_title(f"masked {task}: mean of last {window} episodes", fontsize=10)
        ax.set_xlabel("frames")
        ax.set_ylabel("return")
        if ax.lines[1:]:
            ax.legend()
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_results/classic_pomdp"))
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=["cartpole", "pendulum"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cores", nargs="+", choices=CORE_SPECS, default=list(CORES))
    for task in TASKS:
        parser.add_argument(f"--{task}_frames", type=int, help="default: the example's own")
    parser.add_argument("--jobs", type=int, default=1, help="example processes at a time")
    parser.add_argument(
        "--max_wall_s", type=float, default=None, help="each run stops (and saves) after this"
    )
    parser.add_argument(
        "--budget_s", type=float, default=None, help="wall-clock budget of the whole benchmark"
    )
    parser.add_argument(
        "--stop_at_target",
        action="store_true",
        help="each run stops once it reaches its task's target (saves CPU)",
    )
    parser.add_argument(
        "--mop_layers",
        help="MoP expert sizes per block (default: each example's own: one block on PPO's "
        "cartpole, the paper preset on pendulum and in the DQN)",
    )
    parser.add_argument("--collect", action="store_true", help="summarise finished runs only")
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/classic_pomdp.png"))
    args = parser.parse_args()
    if "cartpole_dqn" in args.tasks and any("+" in core for core in args.cores):
        parser.error("--cores ACTOR+CRITIC is for the PPO tasks: the DQN recipe has no critic")
    if not args.collect:
        frames = {task: getattr(args, f"{task}_frames") for task in TASKS}
        run_all(
            args.out,
            args.tasks,
            args.seeds,
            frames,
            args.jobs,
            args.max_wall_s,
            args.budget_s,
            tuple(args.cores),
            args.stop_at_target,
            args.mop_layers,
        )
    print(table(summarise(args.out)))
    plot(args.out, args.figure)


if __name__ == "__main__":
    main()
