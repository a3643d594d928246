"""Learning results: train configs, evaluate on 500 held-out-seed episodes, print a table.

Usage (each run writes runs/<name>/ and its eval.json; the table goes to stdout and JSON)::

    python benchmarks/learning.py configs/go_to_red_ball_mop.yaml configs/go_to_red_ball_gru.yaml
    python benchmarks/learning.py --collect runs/*        # only tabulate finished runs

Options after the configs override every run (``--num_updates 300``). A run directory that
already holds a checkpoint is resumed, so the script can be re-run after an interruption.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

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
        "eval_episodes": result["episodes"],
    }


def markdown(rows: list[dict]) -> str:
    head = "| level | algo | policy | frames | train wall (min) | success (500 eps) | return | path ratio |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['level']} | {r['algo']} | {r['policy']} | {r['frames']:,} | "
            f"{r['train_wall_min']:.1f} | {r['success_rate']:.3f} | {r['mean_return']:.3f} | "
            f"{'-' if r['path_ratio'] is None else format(r['path_ratio'], '.2f')} |"
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
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = {k: v for k in ("num_updates", "run_dir") if (v := getattr(args, k)) is not None}
    if args.collect:
        rows = [row(Path(p)) for p in args.configs if (Path(p) / "eval.json").exists()]
    else:
        rows = [run_config(p, overrides, args.episodes) for p in args.configs]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(markdown(rows))


if __name__ == "__main__":
    main()
