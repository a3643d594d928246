"""Pathways sweep: MoP policies per routing-cost weight α and seed, routing cost vs difficulty.

    LEVELS=GoToRedBallNoDists,GoToRedBallGrey,GoToRedBall,GoToLocal,PickupLoc,PutNextLocal,GoTo
    python benchmarks/pathways.py --alphas 0,0.01,0.03,0.1 --seeds 0,1,2 --run_dir runs \
        --task_id $LEVELS --level_weights 1,1,1,2,2,2,3 \
        --init_checkpoint <competent α=0 7-level run> --num_updates 300 \
        --difficulty bench_results/difficulty.json \
        --out docs/results/pathways_sweep --figures docs/figures/pathways_sweep

For each α and seed this trains ``--config`` (default ``configs/pathways_mop.yaml``;
``--task_id``, ``--level_weights``, ``--num_updates`` and ``--set KEY=VALUE`` override it) as
run ``pathways-a<α>-s<seed>`` (resumed if a checkpoint exists, skipped if finished; a run there
with other settings is refused). With ``--init_checkpoint`` each run is a warm start: it starts
from that (competent, α=0) policy's weights and trains ``--num_updates`` updates with the cost
on; ``{alpha}`` and ``{seed}`` in the path continue each run of an earlier sweep instead (a
second stage, e.g. at a lower rate). It then records ``--episodes``
greedy held-out episodes per level with their routing (``<run>/routes/``, reused when present),
and writes, under ``--out``:

- ``summary.csv``: ``level, alpha, success, cost_per_step, cost_per_step_success, step0_cost,
  difficulty, episodes, steps, seed`` (validated by
  :func:`~mop_torchrl.analysis.pathways.write_summary_csv`);
- ``spearman.csv``: per α, seed and measure (``spec_rank``: ``LEVEL_DIFFICULTY``;
  ``log10_frames``: the ``--difficulty`` JSON of ``benchmarks/difficulty.py``), Spearman ρ of
  the cost per step over successful episodes against difficulty with a bootstrap 95% interval
  over episodes (``--resamples``), then one row per α and measure with ``seed = mean``: the
  mean over seeds, its interval, and the lowest and highest seed's ρ;
- ``usage.csv``: per level, block and expert, the mean routing weight and argmax share;
- ``step_types.csv``: cost per step type (turn, forward, pickup, ..., final approach);
- ``runs.csv``: per α and seed, frames and training wall time;

and the figures ``pathways_cost.png`` (cost vs SPEC rank; ``pathways_cost_measured.png``
against the measured difficulty), ``pathways_success.png``, ``pathways_usage.png`` and
``pathways_step_types.png`` under ``--figures``. Runs are trained one at a time (two runs on 2
cores halve each other), seed-major: a stopped sweep has every α of its first seeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
import yaml

from mop_torchrl.analysis import read_routes
from mop_torchrl.analysis.pathways import (
    bootstrap_rho,
    level_summary,
    measured_difficulty,
    plot_cost_vs_difficulty,
    plot_step_types,
    plot_success_vs_alpha,
    plot_usage,
    seed_aggregate,
    spearman_by_seed,
    step_type_costs,
    usage_table,
    write_summary_csv,
)
from mop_torchrl.analysis.record import mop_cores, record_routes
from mop_torchrl.babyai.levels import LEVEL_DIFFICULTY
from mop_torchrl.train import TrainConfig, load_config, train
from mop_torchrl.train.checkpoint import load_checkpoint
from mop_torchrl.train.policy import load_actor

ROOT = Path(__file__).resolve().parent.parent
SPEARMAN_COLUMNS = [
    "alpha", "seed", "measure", "rho", "ci_low", "ci_high", "levels", "rho_min", "rho_max", "seeds"
]  # fmt: skip
RUN_KEYS = ("task_id", "level_weights", "init_checkpoint", "alpha", "seed")
"""Settings a finished run must share with the sweep's to be reused."""


def trained_run(config_path: Path, overrides: dict, alpha: float, seed: int, run_dir: str) -> Path:
    """Trains (or resumes, or skips when finished) the run for ``alpha`` and ``seed``; its
    directory. A finished run there written with other settings is refused, not reused."""
    if "init_checkpoint" in overrides:  # a template continues each run of an earlier sweep
        start = overrides["init_checkpoint"].format(alpha=f"{alpha:g}", seed=seed)
        overrides = {**overrides, "init_checkpoint": start}
    overrides = {
        **overrides,
        "alpha": alpha,
        "seed": seed,
        "run_name": f"pathways-a{alpha:g}-s{seed}",
        "run_dir": run_dir,
    }
    config = load_config(config_path, overrides)
    path = Path(run_dir) / config.name
    checkpoint = path / "checkpoint.pt"
    if not checkpoint.exists():
        train(config)
        return path
    payload = load_checkpoint(checkpoint)
    saved = TrainConfig.from_saved(payload["config"]).to_dict()
    wanted = config.to_dict()
    diff = {k: (saved.get(k), wanted[k]) for k in RUN_KEYS if saved.get(k) != wanted[k]}
    if diff:
        raise SystemExit(f"{path} was trained with other settings (saved, now): {diff}")
    if payload["update"] < config.num_updates:
        train(config, resume=True)
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
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--task_id", help="levels (comma-separated); default: the config's")
    parser.add_argument("--level_weights", help="comma-separated; default: the config's")
    parser.add_argument(
        "--init_checkpoint",
        help="warm start every run from this (α=0) checkpoint or run dir; {alpha} and {seed} in "
        "it continue each run of an earlier sweep (runs/sweep/pathways-a{alpha}-s{seed})",
    )
    parser.add_argument("--num_updates", type=int, help="updates per run; default: the config's")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="other config overrides"
    )
    parser.add_argument("--run_dir", default="runs")
    parser.add_argument("--episodes", type=int, default=100, help="held-out episodes per level")
    parser.add_argument(
        "--difficulty", type=Path, help="measured difficulty JSON (benchmarks/difficulty.py)"
    )
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "pathways")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures")
    args = parser.parse_args()
    overrides = {
        key: value
        for key in ("task_id", "level_weights", "init_checkpoint", "num_updates")
        if (value := getattr(args, key)) is not None
    }
    for item in args.set:  # e.g. dagger_beta=0.5 (the warm start's DAgger schedule)
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    measures = {"spec_rank": LEVEL_DIFFICULTY}
    if args.difficulty is not None:
        measures["log10_frames"] = measured_difficulty(args.difficulty)
    # One intra-op thread: with two, OpenMP spin-waits against the other runs on a small machine
    # and the per-step recording ran about 10x slower.
    torch.set_num_threads(1)

    summaries, usages, step_types, runs, routes_by_run = [], [], [], [], {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for alpha in (float(a) for a in args.alphas.split(",")):
            run = trained_run(args.config, overrides, alpha, seed, args.run_dir)
            torch.set_num_threads(1)  # closing the training envs raised it (torchrl 0.14)
            routes, layers = recorded_routes(run, args.episodes)
            routes_by_run[(alpha, seed)] = routes
            summaries.append(level_summary(routes, alpha, seed))
            usages.append(usage_table(routes, layers, alpha, seed))
            step_types.append(step_type_costs(routes, alpha, seed))
            payload = load_checkpoint(run / "checkpoint.pt")
            wall = payload["extra"].get("wall_s", float("nan")) / 60
            frames = payload["frames"]
            runs.append({"alpha": alpha, "seed": seed, "frames": frames, "train_wall_min": wall})
            print(f"α={alpha:g} seed {seed}: {frames} frames, {wall:.1f} min", flush=True)

    summary = pd.concat(summaries, ignore_index=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_summary_csv(summary, args.out / "summary.csv")
    usage = pd.concat(usages)
    usage.to_csv(args.out / "usage.csv", index=False, float_format="%.4g")
    costs = pd.concat(step_types)
    costs.to_csv(args.out / "step_types.csv", index=False, float_format="%.4g")
    draws = bootstrap_rho(routes_by_run, measures, resamples=args.resamples)
    means = seed_aggregate(draws).assign(seed="mean")
    rho = pd.concat([spearman_by_seed(draws), means], ignore_index=True)[SPEARMAN_COLUMNS]
    rho.to_csv(args.out / "spearman.csv", index=False, float_format="%.4g")
    pd.DataFrame(runs).to_csv(args.out / "runs.csv", index=False, float_format="%.4g")
    plot_cost_vs_difficulty(summary, args.figures / "pathways_cost.png")
    if "log10_frames" in measures:
        plot_cost_vs_difficulty(
            summary, args.figures / "pathways_cost_measured.png", measures["log10_frames"]
        )
    plot_success_vs_alpha(summary, args.figures / "pathways_success.png")
    plot_usage(usage, args.figures / "pathways_usage.png")
    plot_step_types(costs, args.figures / "pathways_step_types.png")
    print(summary.to_string(index=False, float_format="%.3f"))
    print(rho.to_string(index=False, float_format="%.3f"))


if __name__ == "__main__":
    main()
