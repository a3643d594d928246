"""Pathways sweep: one multi-level MoP policy per routing-cost weight α, routing vs difficulty.

    python benchmarks/pathways.py --alphas 0,0.01,0.03,0.1 --run_dir runs \
        --out docs/results/pathways --figures docs/figures

For each α this trains ``configs/pathways_mop.yaml`` (six levels, SPEC difficulty order) as run
``pathways-a<α>`` (resumed if a checkpoint exists, skipped if finished), records ``--episodes``
greedy held-out episodes per level with their routing (``<run>/routes/``, reused when present),
and then writes, under ``--out``:

- ``summary.csv``: ``level, alpha, success, cost_per_step, difficulty, episodes, steps``
  (validated by :func:`~mop_torchrl.analysis.pathways.write_summary_csv`);
- ``usage.csv``: per level, block and expert, the mean routing weight and argmax share;
- ``step_types.csv``: cost per step type (turn, forward, pickup, ..., final approach);
- ``spearman.csv``: per α, Spearman ρ of cost per step vs difficulty rank, mean success;
- ``runs.csv``: per α, frames and training wall time;

and the figures ``pathways_cost.png``, ``pathways_success.png``, ``pathways_step_types.png``
under ``--figures``. Runs are trained one at a time (two runs on 2 cores halve each other).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from mop_torchrl.analysis import read_routes
from mop_torchrl.analysis.pathways import (
    level_summary,
    plot_cost_vs_difficulty,
    plot_step_types,
    plot_success_vs_alpha,
    spearman_by_alpha,
    step_type_costs,
    usage_table,
    write_summary_csv,
)
from mop_torchrl.analysis.record import mop_cores, record_routes
from mop_torchrl.train import load_config, train
from mop_torchrl.train.checkpoint import load_checkpoint
from mop_torchrl.train.policy import load_actor

ROOT = Path(__file__).resolve().parent.parent


def trained_run(config_path: Path, alpha: float, run_dir: str) -> Path:
    """Trains (or resumes, or skips when finished) the run for ``alpha``; its directory."""
    overrides = {"alpha": alpha, "run_name": f"pathways-a{alpha:g}", "run_dir": run_dir}
    config = load_config(config_path, overrides)
    path = Path(run_dir) / config.name
    checkpoint = path / "checkpoint.pt"
    done = checkpoint.exists() and load_checkpoint(checkpoint)["update"] >= config.num_updates
    if not done:
        train(config, resume=checkpoint.exists())
    return path


def recorded_routes(run: Path, episodes: int) -> tuple[pd.DataFrame, list[list[int]]]:
    """The run's held-out routes (recorded once, then read back) and its MoP layers."""
    actor, config = load_actor(run / "checkpoint.pt")
    layers = [list(block) for block in mop_cores(actor)[0].config.layers]
    out = run / "routes"
    if (out / "routes.csv").exists():
        routes = read_routes(out / "routes.csv")
        if routes.groupby("level")["episode"].nunique().min() >= episodes:
            return routes, layers
    routes, _ = record_routes(
        actor, config.task_id, episodes, seed=config.seed, out_dir=out, labels=False
    )
    return routes, layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "pathways_mop.yaml")
    parser.add_argument("--alphas", default="0,0.01,0.03,0.1", help="comma-separated α values")
    parser.add_argument("--run_dir", default="runs")
    parser.add_argument("--episodes", type=int, default=100, help="held-out episodes per level")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "pathways")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures")
    args = parser.parse_args()
    # One intra-op thread: with two, OpenMP spin-waits against the other runs on a small machine
    # and the per-step recording ran about 10x slower.
    torch.set_num_threads(1)

    summaries, usages, step_types, runs = [], [], [], []
    for alpha in (float(a) for a in args.alphas.split(",")):
        run = trained_run(args.config, alpha, args.run_dir)
        torch.set_num_threads(1)  # closing the training envs raised it (torchrl 0.14)
        routes, layers = recorded_routes(run, args.episodes)
        summaries.append(level_summary(routes, alpha))
        usages.append(usage_table(routes, layers, alpha))
        step_types.append(step_type_costs(routes, alpha))
        payload = load_checkpoint(run / "checkpoint.pt")
        wall = payload["extra"].get("wall_s", float("nan")) / 60
        runs.append({"alpha": alpha, "frames": payload["frames"], "train_wall_min": wall})
        print(f"α={alpha:g}: {payload['frames']} frames, {wall:.1f} min", flush=True)

    summary = pd.concat(summaries, ignore_index=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_summary_csv(summary, args.out / "summary.csv")
    pd.concat(usages).to_csv(args.out / "usage.csv", index=False, float_format="%.4g")
    costs = pd.concat(step_types)
    costs.to_csv(args.out / "step_types.csv", index=False, float_format="%.4g")
    rho = spearman_by_alpha(summary)
    rho.to_csv(args.out / "spearman.csv", index=False, float_format="%.4g")
    pd.DataFrame(runs).to_csv(args.out / "runs.csv", index=False, float_format="%.4g")
    plot_cost_vs_difficulty(summary, args.figures / "pathways_cost.png")
    plot_success_vs_alpha(summary, args.figures / "pathways_success.png")
    plot_step_types(costs, args.figures / "pathways_step_types.png")
    print(summary.to_string(index=False, float_format="%.3f"))
    print(rho.to_string(index=False, float_format="%.3f"))


if __name__ == "__main__":
    main()
