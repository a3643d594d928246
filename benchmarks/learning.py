"""Learning results: train configs, evaluate on 500 held-out-seed episodes, print a table.

Usage (each run writes runs/<name>/ and its eval.json; the table goes to stdout and JSON)::

    python benchmarks/learning.py configs/go_to_red_ball_mop.yaml configs/go_to_red_ball_gru.yaml
    python benchmarks/learning.py --collect runs/*        # only tabulate finished runs
    python benchmarks/learning.py --collect runs/* --curves docs/figures/learning_curves.png

The final evaluation includes the grounding probe (label accuracy on held-out bot episodes
with true vs shuffled missions). ``--curves`` plots the held-out success logged every
``eval_interval`` updates (``eval/success_rate``) against frames, one panel per level.

Options after the configs override every run (``--num_updates 300``). A run directory that
already holds a checkpoint is resumed, so the script can be re-run after an interruption.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from mop_torchrl.train import load_config, train
from mop_torchrl.train.checkpoint import load_checkpoint
from mop_torchrl.train.evaluate import evaluate_checkpoint


def run_config(path: str, overrides: dict, episodes: int) -> dict:
    config = load_config(path, {**overrides, "eval_episodes": 0})
    run_dir = Path(config.run_dir) / config.name
    train(config, resume=(run_dir / "checkpoint.pt").exists())
    result = evaluate_checkpoint(run_dir / "checkpoint.pt", episodes=episodes)
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return row(run_dir)


def row(run_dir: Path) -> dict:
    result = json.loads((run_dir / "eval.json").read_text())
    payload = load_checkpoint(run_dir / "checkpoint.pt")
    config = payload["config"]
    return {
        "run": run_dir.name,
        "level": config["task_id"],
        "algo": config["algo"],
        "policy": config["policy"],
        "updates": payload["update"],
        "frames": payload["frames"],
        "train_wall_min": payload["extra"].get("wall_s", float("nan")) / 60,
        "success_rate": result["success_rate"],
        "mean_return": result["mean_return"],
        "path_ratio": result["path_ratio"],
        "routing_cost": result["routing_cost"],
        "label_accuracy": result.get("label_accuracy"),
        "label_accuracy_shuffled": result.get("label_accuracy_shuffled"),
        "eval_episodes": result["episodes"],
        "seed": config["seed"],
        "frames_per_update": config["num_envs"] * config["unroll_len"],
        "run_dir": str(run_dir),
    }


DIFFICULTY = [
    "GoToRedBallNoDists",
    "GoToRedBallGrey",
    "GoToRedBall",
    "GoToLocal",
    "PickupLoc",
    "PutNextLocal",
    "GoTo",
]
"""SPEC §4's order, easiest first (the panels' order)."""


def run_levels(r: dict) -> list[str]:
    """The short names of a run's levels (several for a multi-level run)."""
    levels = r["level"].split(",") if isinstance(r["level"], str) else r["level"]
    return [level.removeprefix("BabyAI-").removesuffix("-v0") for level in levels]


def logged_curve(path: Path, frames_per_update: int) -> tuple[list[float], list[float]]:
    """(frames in thousands, values) of one ``eval/*.csv`` log."""
    points = [map(float, line.split(",")) for line in path.read_text().split()]
    steps, values = zip(*points)
    return [step * frames_per_update / 1000 for step in steps], list(values)


def curves(rows: list[dict], out: Path) -> None:
    """Held-out success and grounding gap vs frames (``eval/*`` in each run's CSV logs), one
    column per level; a multi-level run draws each level's success in that level's column
    (``eval/<level>/success_rate``) and its overall grounding gap in every one of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = {level for r in rows for level in run_levels(r)}
    levels = [lv for lv in DIFFICULTY if lv in found] + sorted(found - set(DIFFICULTY))
    fig, axes = plt.subplots(
        2, len(levels), figsize=(4 * len(levels), 6), squeeze=False, sharex="col"
    )
    colors = {"mop": "tab:blue", "gru": "tab:orange"}
    for r in rows:
        logs = Path(r["run_dir"]) / "logs" / "scalars" / "eval"
        mixture = len(run_levels(r)) > 1
        label = f"{'MoP' if r['policy'] == 'mop' else 'GRU(512)'} s{r['seed']}"
        style = {
            "color": "tab:green" if mixture else colors[r["policy"]],
            "alpha": 1.0 - 0.35 * r["seed"],
            "marker": ".",
            "label": f"{label}, {len(run_levels(r))} levels" if mixture else label,
        }
        for level in run_levels(r):
            column = levels.index(level)
            success = logs / level / "success_rate.csv" if mixture else logs / "success_rate.csv"
            for row, path in enumerate((success, logs / "grounding_gap.csv")):
                if path.exists():
                    axes[row][column].plot(*logged_curve(path, r["frames_per_update"]), **style)
    for column, level in enumerate(levels):
        axes[0][column].set_title(level)
        axes[1][column].set_xlabel("frames (k)")
        for row in range(2):
            axes[row][column].grid(alpha=0.3)
            axes[row][column].set_ylim(0 if row == 0 else -0.1, 1.02 if row == 0 else 0.6)
    axes[0][0].set_ylabel("held-out success")
    axes[1][0].set_ylabel("grounding gap\n(label acc. true − shuffled missions)")
    for ax in axes[0]:
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Online imitation (DAgger with replay), evaluated every eval_interval updates")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def markdown(rows: list[dict]) -> str:
    head = (
        "| level | algo | policy | seed | frames | train wall (min) | success | return | "
        "path ratio | label acc. true / shuffled | routing cost |"
    )
    lines = [head, "|" + "---|" * 11]
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['level']} | {r['algo']} | {r['policy']} | {r['seed']} | {r['frames']:,} | "
            f"{r['train_wall_min']:.1f} | {r['success_rate']:.3f} | {r['mean_return']:.3f} | "
            f"{fmt(r['path_ratio'], '.2f')} | {fmt(r['label_accuracy'], '.2f')} / "
            f"{fmt(r['label_accuracy_shuffled'], '.2f')} | {fmt(r['routing_cost'], '.3f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="config files, or run dirs with --collect")
    parser.add_argument("--collect", action="store_true", help="tabulate finished run dirs")
    parser.add_argument("--episodes", type=int, default=500)
    parser.add_argument("--out", default="bench_results/learning.json")
    parser.add_argument("--num_updates", type=int)
    parser.add_argument("--run_dir")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="other config overrides"
    )
    parser.add_argument("--curves", help="write the learning-curve figure (PNG) here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = {
        k: v for k in ("num_updates", "run_dir", "seed") if (v := getattr(args, k)) is not None
    }
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    if args.collect:
        rows = [row(Path(p)) for p in args.configs if (Path(p) / "eval.json").exists()]
    else:
        rows = [run_config(p, overrides, args.episodes) for p in args.configs]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(markdown(rows))
    if args.curves:
        curves(rows, Path(args.curves))


if __name__ == "__main__":
    main()
