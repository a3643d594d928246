"""Learning benchmark beyond BabyAI: MoP vs GRU vs LSTM on masked CartPole and masked Pendulum.

    python benchmarks/classic_pomdp.py --out bench_results/classic_pomdp      # run (resumable)
    python benchmarks/classic_pomdp.py --out bench_results/classic_pomdp --collect

Runs ``examples/recurrent_dqn.py`` (masked CartPole) and ``examples/recurrent_ppo.py`` (masked
Pendulum) for every core and seed, one process at a time, seed by seed (so a cut-short run still
has every core on the finished seeds); a run whose JSON exists is skipped. Each run's wall time
and CPU time are recorded (on a shared machine the CPU time is the comparable one). ``--collect``
writes ``summary.json``, prints a markdown table (final return, frames to reach the target,
MoP routing per block) and plots return vs frames (mean and range over seeds) to ``--figure``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CORES = ("mop", "gru", "lstm")
TASKS = {
    # name: (script, target return, rolling window in episodes for the target)
    "cartpole": ("recurrent_dqn.py", 475.0, 100),
    "pendulum": ("recurrent_ppo.py", -200.0, 20),
}


def run_all(out: Path, seeds: list[int], frames: dict[str, int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for task, (script, _, _) in TASKS.items():
            for core in CORES:
                path = out / f"{task}_{core}_s{seed}.json"
                if path.exists():
                    continue
                cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                start = time.perf_counter()
                cmd = [sys.executable, str(ROOT / "examples" / script), "--core", core]
                cmd += ["--seed", str(seed), "--frames", str(frames[task]), "--out", str(path)]
                if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
                    print(f"{task} {core} seed {seed}: FAILED (see its stderr above)", flush=True)
                    continue
                cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                record = json.loads(path.read_text())
                record["process_wall_s"] = time.perf_counter() - start
                record["process_cpu_s"] = (cpu1.ru_utime - cpu0.ru_utime) + (
                    cpu1.ru_stime - cpu0.ru_stime
                )
                path.write_text(json.dumps(record))
                print(
                    f"{task:8} {core:4} seed {seed}: {record['frames']} frames, "
                    f"wall {record['process_wall_s']:.0f} s, cpu {record['process_cpu_s']:.0f} s",
                    flush=True,
                )


def rolling(curve: list, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames at each finished episode and the mean return of the last ``window`` episodes."""
    frames = np.array([f for f, _ in curve], dtype=float)
    returns = np.array([r for _, r in curve], dtype=float)
    cumsum = np.concatenate([[0.0], np.cumsum(returns)])
    idx = np.arange(1, len(returns) + 1)
    lo = np.maximum(idx - window, 0)
    return frames, (cumsum[idx] - cumsum[lo]) / (idx - lo)


def summarise(out: Path) -> dict:
    summary: dict = {}
    for task, (_, target, window) in TASKS.items():
        for core in CORES:
            runs = [json.loads(p.read_text()) for p in sorted(out.glob(f"{task}_{core}_s*.json"))]
            if not runs:
                continue
            finals, reach = [], []
            for run in runs:
                frames, mean = rolling(run["curve"], window)
                finals.append(float(mean[-1]) if len(mean) else float("nan"))
                hit = np.nonzero((mean >= target) & (np.arange(len(mean)) + 1 >= window))[0]
                reach.append(float(frames[hit[0]]) if len(hit) else None)
            summary[f"{task}/{core}"] = {
                "task": task,
                "core": core,
                "seeds": [r["seed"] for r in runs],
                "frames": [r["frames"] for r in runs],
                "params": runs[0]["params"],
                "final_return": finals,
                "target": target,
                "window": window,
                "frames_to_target": reach,
                "wall_s": [r.get("process_wall_s", r["wall_s"]) for r in runs],
                "cpu_s": [r.get("process_cpu_s") for r in runs],
                "routing": [r["routing"] for r in runs] if core == "mop" else None,
            }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def table(summary: dict) -> str:
    rows = [
        "| task | core | params | seeds | frames | final return (mean of seeds; each) "
        "| frames to target | wall s (mean) | CPU s (mean) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary.values():
        each = ", ".join(f"{r:.0f}" for r in s["final_return"])
        reach = ", ".join("—" if r is None else f"{r:,.0f}" for r in s["frames_to_target"])
        cpu = [c for c in s["cpu_s"] if c is not None]
        rows.append(
            f"| {s['task']} | {s['core']} | {s['params']:,} | {len(s['seeds'])} "
            f"| {s['frames'][0]:,} | {np.mean(s['final_return']):.0f} ({each}) | {reach} "
            f"| {np.mean(s['wall_s']):.0f} | {np.mean(cpu) if cpu else float('nan'):.0f} |"
        )
    for s in summary.values():
        if s["routing"]:
            blocks = np.mean(np.array(s["routing"], dtype=float), axis=0)
            text = "; ".join(
                f"block {b}: " + "/".join(f"{w:.2f}" for w in weights)
                for b, weights in enumerate(blocks)
            )
            rows.append(f"\nMoP routing on {s['task']} (experts 0/16/32, mean weights): {text}")
    return "\n".join(rows)


def plot(out: Path, figure: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(11, 4))
    for ax, (task, (_, target, window)) in zip(axes, TASKS.items()):
        for core in CORES:
            runs = [json.loads(p.read_text()) for p in sorted(out.glob(f"{task}_{core}_s*.json"))]
            if not runs:
                continue
            rolled = [rolling(run["curve"], window) for run in runs]
            start = max(frames[0] for frames, _ in rolled)  # every seed has an episode
            grid = np.linspace(start, min(r["frames"] for r in runs), 100)
            curves = np.array([np.interp(grid, frames, mean) for frames, mean in rolled])
            (line,) = ax.plot(grid, curves.mean(0), label=f"{core} ({len(runs)} seeds)")
            ax.fill_between(grid, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.2)
        ax.axhline(target, color="grey", ls="--", lw=0.8)
        ax.set_title(f"masked {task} (mean of last {window} episodes)")
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cartpole_frames", type=int, default=20_480)
    parser.add_argument("--pendulum_frames", type=int, default=20_480)
    parser.add_argument("--collect", action="store_true", help="summarise finished runs only")
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/classic_pomdp.png"))
    args = parser.parse_args()
    if not args.collect:
        frames = {"cartpole": args.cartpole_frames, "pendulum": args.pendulum_frames}
        run_all(args.out, args.seeds, frames)
    print(table(summarise(args.out)))
    plot(args.out, args.figure)


if __name__ == "__main__":
    main()
