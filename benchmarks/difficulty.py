"""Level difficulty measured the paper's way, transposed to imitation (issue 21, item 2).

The paper defines a task's difficulty as the log of the median number of training steps a
64-unit GRU needs to reach a loss threshold, over 5 repeats. Here, per level: the frames a GRU
baseline trained by DAgger (the shipped GoToLocal settings, ``--hidden`` units, the student
acting throughout) needs before its label accuracy on held-out bot-driven episodes (the
grounding probe's, true missions) reaches ``--threshold``; the median over ``--seeds``, and
its log10. A run that does not reach the
threshold within ``--max_frames`` counts as not reached (``null`` in the JSON, infinite in the
median).

Each run is evaluated every ``--interval`` updates and stops after the first evaluation that
reaches the threshold: it trains ``--chunk`` updates (several intervals), then is resumed for
the next chunk (a resumed run is the run it would have been uninterrupted), so an easy level
costs little and the start-up of each resume (the probe's bot episodes, the envs) is paid once
a chunk; the frames are read at the evaluation's resolution whatever the chunk. A measurement
that was stopped continues its runs from their last evaluation when started again. Results (per run:
frames, episodes, accuracies) go to ``bench_results/difficulty.json``, and the table prints::

    python benchmarks/difficulty.py --levels GoToRedBallNoDists,GoToLocal --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import statistics
from pathlib import Path

from mop_torchrl.babyai.levels import level_name
from mop_torchrl.train import load_config, resume, train

SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "go_to_local_gru.yaml"
LEVELS = "GoToRedBallNoDists,GoToRedBallGrey,GoToRedBall,GoToLocal,PickupLoc,PutNextLocal,GoTo"


def frames_to_threshold(run_dir: Path, threshold: float, frames_per_update: int) -> float | None:
    """Frames at the first evaluation of ``run_dir`` whose probe label accuracy reaches
    ``threshold`` (``None``: not reached yet), from its ``eval/label_accuracy.csv`` log."""
    path = run_dir / "logs" / "scalars" / "eval" / "label_accuracy.csv"
    if not path.is_file():
        return None
    for row in csv.reader(path.read_text().splitlines()):
        update, accuracy = int(float(row[0])), float(row[-1])
        if accuracy >= threshold:
            return float(update * frames_per_update)
    return None


def evaluated_updates(run_dir: Path) -> int:
    """The last evaluated update of an earlier (stopped) run in ``run_dir``, 0 if none: the
    measurement continues it instead of starting over."""
    path = run_dir / "logs" / "scalars" / "eval" / "label_accuracy.csv"
    if not (run_dir / "checkpoint.pt").is_file() or not path.is_file():
        return 0
    rows = list(csv.reader(path.read_text().splitlines()))
    return int(float(rows[-1][0])) if rows else 0


def measure(level: str, seed: int, args: argparse.Namespace) -> dict:
    """Trains the GRU baseline on ``level`` one interval at a time until the threshold."""
    config = load_config(
        args.config,
        {
            "task_id": level,
            "seed": seed,
            "policy": "gru",
            "gru_hidden_size": args.hidden,
            "dagger_beta": 0.0,  # the student acts throughout: no schedule tied to a budget
            "eval_interval": args.interval,
            "eval_interval_episodes": args.probe_episodes,
            "checkpoint_interval": args.interval,
            "eval_episodes": 0,
            "run_dir": str(args.run_dir),
            "run_name": f"difficulty-{level_name(level)}-h{args.hidden}-s{seed}",
        },
    )
    frames_per_update = config.num_envs * config.unroll_len
    max_updates = max(args.interval, args.max_frames // frames_per_update)
    run_dir = Path(config.run_dir) / config.run_name
    updates = evaluated_updates(run_dir)
    if updates == 0:  # nothing to continue: a fresh run of one chunk
        updates = min(args.chunk, max_updates)
        run_dir = train(dataclasses.replace(config, num_updates=updates), overwrite=True)
    reached = frames_to_threshold(run_dir, args.threshold, frames_per_update)
    while reached is None and updates < max_updates:
        updates = min(updates + args.chunk, max_updates)
        resume(run_dir, {"num_updates": updates})
        reached = frames_to_threshold(run_dir, args.threshold, frames_per_update)
    path = run_dir / "logs" / "scalars" / "eval" / "label_accuracy.csv"
    curve = [[float(v) for v in row] for row in csv.reader(path.read_text().splitlines())]
    return {
        "level": level_name(level),
        "seed": seed,
        "frames": reached,
        "trained_frames": updates * frames_per_update,
        "label_accuracy": curve,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default=LEVELS, help="comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated")
    parser.add_argument("--config", default=str(SHIPPED), help="base settings (YAML)")
    parser.add_argument("--hidden", type=int, default=64, help="GRU hidden size (paper: 64)")
    parser.add_argument("--threshold", type=float, default=0.9, help="probe label accuracy")
    parser.add_argument("--interval", type=int, default=20, help="updates between evaluations")
    parser.add_argument("--chunk", type=int, default=100, help="updates per training call")
    parser.add_argument("--probe_episodes", type=int, default=50, help="bot episodes per probe")
    parser.add_argument("--max_frames", type=int, default=1_000_000, help="per run")
    parser.add_argument("--run_dir", type=Path, default=Path("runs/difficulty"))
    parser.add_argument("--out", type=Path, default=Path("bench_results/difficulty.json"))
    args = parser.parse_args(argv)
    if args.chunk < 1 or args.chunk % args.interval:
        parser.error(f"--chunk ({args.chunk}) must be a positive multiple of --interval")
    runs = []
    for seed in args.seeds.split(","):  # seed-major: a stopped measurement has every level
        for level in args.levels.split(","):
            runs.append(measure(level, int(seed), args))
            result = write_result(runs, args)
    return result


def write_result(runs: list[dict], args: argparse.Namespace) -> dict:
    """The per-level table of the runs so far, printed and written to ``args.out`` (after
    every run, so that a stopped measurement keeps what it has)."""
    table = {}
    for level in dict.fromkeys(run["level"] for run in runs):
        frames = [run["frames"] for run in runs if run["level"] == level]
        median = statistics.median(math.inf if f is None else f for f in frames)
        log10 = math.log10(median) if median > 0 else -math.inf
        table[level] = {"frames": frames, "median": None if math.isinf(median) else median}
        table[level]["log10"] = None if math.isinf(log10) else log10
        print(f"{level:22s} median {median:>12,.0f} frames  log10 {log10:.2f}")
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "table": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
