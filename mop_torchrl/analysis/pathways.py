"""Do pathways track difficulty? Per-level routing cost of multi-level policies across α and seeds.

A multi-level MoP policy is trained once per routing-cost weight α and seed
(``benchmarks/pathways.py``); its greedy held-out episodes on every level are recorded as a
routes table (:func:`~mop_torchrl.analysis.record.record_routes`). From those tables this
module builds the sweep's summary (one row per level, α and seed: success, routing cost per step
in the config's normalised units over all episodes and over the successful ones only, the cost
of the first step, difficulty rank from :data:`~mop_torchrl.babyai.levels.LEVEL_DIFFICULTY`),
the Spearman correlation of cost with difficulty (the SPEC rank, or the difficulty measured by
``benchmarks/difficulty.py``: :func:`measured_difficulty`) per run with a bootstrap interval
over episodes and averaged over seeds, the cost per step type (turns, moves, object
interactions, the last steps before the goal), expert usage and the figures.

The correlation uses the cost over successful episodes: a failed episode runs to the level's
step limit and its cost rises as it wanders, so the cost over all episodes tracks failure as
much as difficulty.

Examples:
    Three levels: one or two episodes each, one or two steps per episode (the columns the
    summary reads; a recorded routes table has them all):

    >>> import pandas as pd
    >>> from mop_torchrl.analysis.pathways import (bootstrap_rho, level_summary,
    ...                                            spearman_by_seed)
    >>> from mop_torchrl.babyai.levels import LEVEL_DIFFICULTY
    >>> rows = [  # level, episode, step, success, cost
    ...     ("GoToRedBall", 0, 0, 1, 1.0), ("GoToRedBall", 0, 1, 1, 1.0),
    ...     ("GoToLocal", 1, 0, 1, 2.0), ("GoToLocal", 2, 0, 0, 1.0), ("GoToLocal", 2, 1, 0, 5.0),
    ...     ("PickupLoc", 3, 0, 1, 3.0), ("PickupLoc", 3, 1, 1, 3.0), ("PickupLoc", 4, 0, 0, 0.5)]
    >>> routes = pd.DataFrame(rows, columns=["level", "episode", "step", "success", "cost"])
    >>> summary = level_summary(routes, alpha=0.01, seed=0)
    >>> columns = ["level", "success", "cost_per_step", "cost_per_step_success", "step0_cost"]
    >>> summary[columns].round(3).values.tolist()  # doctest: +NORMALIZE_WHITESPACE
    [['GoToRedBall', 1.0, 1.0, 1.0, 1.0], ['GoToLocal', 0.5, 2.667, 2.0, 1.5],
     ['PickupLoc', 0.5, 2.167, 3.0, 1.75]]

    The failed GoToLocal episode makes the all-episode cost non-monotone in difficulty; over
    successful episodes ρ is 1 (the interval comes from 200 resamples of each level's episodes):

    >>> draws = bootstrap_rho({(0.01, 0): routes}, {"rank": LEVEL_DIFFICULTY}, resamples=200)
    >>> spearman_by_seed(draws)[["alpha", "seed", "measure", "rho", "levels"]].values.tolist()
    [[0.01, 0, 'rank', 1.0, 3]]
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from mop_torchrl.analysis.plots import save_figure
from mop_torchrl.analysis.summary import utilisation
from mop_torchrl.babyai.levels import ACTION_NAMES, LEVEL_DIFFICULTY, level_name

__all__ = [
    "SUMMARY_COLUMNS",
    "bootstrap_rho",
    "episode_table",
    "level_summary",
    "measured_difficulty",
    "plot_cost_vs_difficulty",
    "plot_step_types",
    "plot_success_vs_alpha",
    "plot_usage",
    "seed_aggregate",
    "spearman_by_alpha",
    "spearman_by_seed",
    "step_type",
    "step_type_costs",
    "usage_table",
    "validate_summary",
    "write_summary_csv",
]

SUMMARY_COLUMNS: dict[str, str] = {
    "level": "short level name (a key of LEVEL_DIFFICULTY)",
    "alpha": "routing-cost weight of the run (normalised cost units)",
    "success": "greedy success rate on the held-out episodes",
    "cost_per_step": "mean routing cost per step on those episodes (normalised units)",
    "cost_per_step_success": "mean routing cost per step over the steps of the successful "
    "episodes (NaN when none succeeded)",
    "step0_cost": "mean routing cost of the first step (step 0) of each episode",
    "difficulty": "difficulty rank of the level (SPEC order; ties share a rank)",
    "episodes": "held-out episodes recorded",
    "steps": "steps recorded",
    "seed": "training seed of the run",
}
"""Columns of the pathway summary CSV, in order, with their meaning."""

LAST_STEPS = 3
"""Steps before the end of a successful episode counted as ``"final approach"``."""


def episode_table(routes: pd.DataFrame) -> pd.DataFrame:
    """One row per recorded episode: ``level`` (short name), ``episode``, ``success``,
    ``steps``, ``cost`` (summed over its steps) and ``step0_cost`` (its step 0), levels in the
    order they were recorded: what the summary and the bootstrap resample."""
    step0 = routes["cost"].where(routes["step"] == 0)
    table = (
        routes.assign(step0_cost=step0)
        .groupby(["level", "episode"], sort=False)
        .agg(
            success=("success", "first"),
            steps=("cost", "size"),
            cost=("cost", "sum"),
            step0_cost=("step0_cost", "first"),
        )
        .reset_index()
    )
    table["level"] = table["level"].map(level_name)
    return table


def _success_cost(episodes: pd.DataFrame, draws: np.ndarray) -> np.ndarray:
    """Cost per step over the steps of the successful episodes of one level's
    :func:`episode_table` rows, for each row of episode indices ``draws`` (shape
    ``(n_draws, n_episodes)``); NaN for a draw without a success."""
    won = episodes["success"].to_numpy(dtype=float)
    cost = (episodes["cost"].to_numpy(dtype=float) * won)[draws].sum(axis=1)
    steps = (episodes["steps"].to_numpy(dtype=float) * won)[draws].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(steps > 0, cost / steps, np.nan)


def level_summary(routes: pd.DataFrame, alpha: float, seed: int = 0) -> pd.DataFrame:
    """One row per level of a routes table (:data:`SUMMARY_COLUMNS`), validated.

    Levels outside :data:`~mop_torchrl.babyai.levels.LEVEL_DIFFICULTY` are refused: their rank is
    not agreed.
    """
    rows = []
    for level, sub in episode_table(routes).groupby("level", sort=False):
        rows.append(
            {
                "level": level,
                "alpha": float(alpha),
                "success": float(sub["success"].mean()),
                "cost_per_step": float(sub["cost"].sum() / sub["steps"].sum()),
                "cost_per_step_success": float(_success_cost(sub, np.arange(len(sub))[None])[0]),
                "step0_cost": float(sub["step0_cost"].mean()),
                "difficulty": LEVEL_DIFFICULTY.get(str(level), -1),
                "episodes": len(sub),
                "steps": int(sub["steps"].sum()),
                "seed": int(seed),
            }
        )
    summary = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    validate_summary(summary)
    return summary


def validate_summary(summary: pd.DataFrame) -> None:
    """Checks a pathway summary against :data:`SUMMARY_COLUMNS`.

    Raises:
        ValueError: naming the first problem (missing column, level without a difficulty
            rank, rate outside [0, 1], negative or non-finite cost, a success cost missing on a
            level that succeeded, seed not a non-negative integer, repeated level × α × seed).
    """
    missing = [c for c in SUMMARY_COLUMNS if c not in summary.columns]
    if missing:
        raise ValueError(f"pathway summary lacks columns {missing}")
    unknown = sorted(set(summary["level"]) - set(LEVEL_DIFFICULTY))
    if unknown:
        raise ValueError(f"levels {unknown} have no agreed difficulty rank (LEVEL_DIFFICULTY)")
    ranks = summary["level"].map(LEVEL_DIFFICULTY)
    if not (ranks == summary["difficulty"]).all():
        raise ValueError("column 'difficulty' disagrees with LEVEL_DIFFICULTY")
    if not summary["success"].between(0, 1).all():
        raise ValueError("column 'success' must lie in [0, 1]")
    for column in ("alpha", "cost_per_step", "step0_cost"):
        values = summary[column].to_numpy(dtype=float)
        if not (np.isfinite(values).all() and (values >= 0).all()):
            raise ValueError(f"column {column!r} must be finite and >= 0")
    values = summary["cost_per_step_success"].to_numpy(dtype=float)
    allowed = (np.isfinite(values) & (values >= 0)) | (np.isnan(values) & (summary["success"] == 0))
    if not allowed.all():
        raise ValueError(
            "column 'cost_per_step_success' must be finite and >= 0 (NaN only on a level "
            "without a successful episode)"
        )
    if not pd.api.types.is_integer_dtype(summary["seed"]) or (summary["seed"] < 0).any():
        raise ValueError("column 'seed' must hold integers >= 0")
    if (summary["episodes"] <= 0).any() or (summary["steps"] < summary["episodes"]).any():
        raise ValueError("columns 'episodes' must be > 0 and 'steps' >= 'episodes'")
    if summary.duplicated(["level", "alpha", "seed"]).any():
        raise ValueError("pathway summary repeats a (level, alpha, seed) triple")


def write_summary_csv(summary: pd.DataFrame, path: str | Path) -> Path:
    """Validates ``summary`` and writes it as CSV (columns in :data:`SUMMARY_COLUMNS` order)."""
    validate_summary(summary)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary[list(SUMMARY_COLUMNS)].to_csv(path, index=False, float_format="%.6g")
    return path


def usage_table(
    routes: pd.DataFrame, layers: Sequence[Sequence[int]], alpha: float, seed: int = 0
) -> pd.DataFrame:
    """Per level, block and expert: mean routing weight and argmax share, with ``alpha`` and
    ``seed``."""
    table = utilisation(routes, layers).query("mission_type == 'all' and level != 'all'").copy()
    table["level"] = table["level"].map(level_name)
    table.insert(1, "alpha", float(alpha))
    table.insert(2, "seed", int(seed))
    return table.drop(columns="mission_type").reset_index(drop=True)


def measured_difficulty(path: str | Path) -> dict[str, float]:
    """Measured difficulty per level (short name): log10 of the median frames a GRU needs to
    reach the label-accuracy threshold, from the JSON ``benchmarks/difficulty.py`` writes.

    A level whose median was not reached within the budget (``null``) is ``inf``: the hardest,
    which a rank correlation places last. Levels the JSON lacks are absent (a Spearman ρ
    against this measure leaves them out).

    Raises:
        ValueError: for a JSON without the ``"table"`` that script writes.
    """
    result = json.loads(Path(path).read_text())
    if not isinstance(result, dict) or not isinstance(result.get("table"), dict):
        raise ValueError(f"{str(path)!r} has no 'table' (written by benchmarks/difficulty.py)")
    difficulty = {}
    for level, entry in result["table"].items():
        log10 = entry.get("log10")
        if log10 is None:  # not reached: median null; reached at frame 0: log10 of 0
            log10 = math.inf if entry.get("median") is None else -math.inf
        difficulty[level_name(level)] = float(log10)
    return difficulty


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank (``inf`` ranks last)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2)[inverse]


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """Spearman ρ of the pairs where neither is NaN, and their number; ρ is NaN where fewer
    than 3 pairs or a constant side make it undefined."""
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if len(x) < 3:
        return float("nan"), len(x)
    rx, ry = _average_ranks(x), _average_ranks(y)
    if np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return float("nan"), len(x)
    return float(np.corrcoef(rx, ry)[0, 1]), len(x)


def spearman_by_alpha(
    summary: pd.DataFrame,
    cost: str = "cost_per_step",
    difficulty: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """Spearman ρ between a per-level cost column and difficulty, for each α (and each seed
    when the summary has a ``seed`` column); no interval (:func:`bootstrap_rho` gives one).

    ``difficulty`` maps short level names to a measure (e.g. :func:`measured_difficulty`);
    default: the summary's ``difficulty`` rank. Levels without a cost (no success) or without a
    difficulty value are left out; ρ is NaN where fewer than 3 levels remain or one side is
    constant. Columns: ``alpha[, seed], spearman_rho, levels`` (levels used), ``mean_success``.
    """
    keys = ["alpha", "seed"] if "seed" in summary.columns else ["alpha"]
    rows = []
    for key, sub in summary.groupby(keys, sort=True):
        measure = sub["difficulty"] if difficulty is None else sub["level"].map(difficulty)
        rho, levels = _spearman(sub[cost].to_numpy(dtype=float), measure.to_numpy(dtype=float))
        rows.append(
            {
                **dict(zip(keys, key)),
                "spearman_rho": rho,
                "levels": levels,
                "mean_success": float(sub["success"].mean()),
            }
        )
    return pd.DataFrame(rows)


def bootstrap_rho(
    runs: Mapping[tuple[float, int], pd.DataFrame],
    measures: Mapping[str, Mapping[str, float]],
    resamples: int = 1000,
    rng_seed: int = 0,
) -> pd.DataFrame:
    """Spearman ρ between each level's cost per step over successful episodes and each
    difficulty measure, per ``(alpha, seed)`` run, on its recorded episodes and on bootstrap
    resamples of them.

    A resample draws each level's episodes with replacement (as many as were recorded) and
    recomputes the per-level cost; all measures share the resamples. A level without a success
    (in the episodes or the resample) or without a value in a measure is left out of that ρ.
    Each run draws from its own generator, seeded by ``(rng_seed, seed, α)``, so its draws do
    not depend on the other runs.

    Args:
        runs: routes table of each ``(alpha, seed)`` run.
        measures: per measure name, difficulty by short level name (``LEVEL_DIFFICULTY``,
            :func:`measured_difficulty`).
        resamples: bootstrap resamples per run.
        rng_seed: seed of the resampling.

    Returns:
        One row per run, measure and draw: ``alpha, seed, measure, draw, rho, levels`` (levels
        in that ρ), ``draw`` 0 being the recorded episodes and ``1..resamples`` the resamples
        (read by :func:`spearman_by_seed` and :func:`seed_aggregate`).
    """
    rows = []
    for (alpha, seed), routes in sorted(runs.items()):
        rng = np.random.default_rng([rng_seed, int(seed), round(float(alpha) * 1e9)])
        names, costs = [], []
        for level, sub in episode_table(routes).groupby("level", sort=False):
            n = len(sub)
            draws = np.vstack([np.arange(n), rng.integers(0, n, size=(resamples, n))])
            names.append(level)
            costs.append(_success_cost(sub, draws))
        per_draw = np.stack(costs, axis=1)  # (1 + resamples, levels)
        for measure, values in measures.items():
            y = np.array([values.get(str(name), np.nan) for name in names], dtype=float)
            for draw, x in enumerate(per_draw):
                rho, levels = _spearman(x, y)
                rows.append(
                    {
                        "alpha": float(alpha),
                        "seed": int(seed),
                        "measure": measure,
                        "draw": draw,
                        "rho": rho,
                        "levels": levels,
                    }
                )
    return pd.DataFrame(rows)


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of the defined (non-NaN) values; NaNs when none is."""
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    low, high = np.percentile(values, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(low), float(high)


def spearman_by_seed(draws: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per run and measure of :func:`bootstrap_rho`'s draws: ρ on the recorded episodes and
    the percentile interval of the resamples' ρ (undefined ones left out). Columns ``alpha,
    seed, measure, rho, ci_low, ci_high, levels``."""
    rows = []
    for (alpha, seed, measure), sub in draws.groupby(["alpha", "seed", "measure"], sort=False):
        point = sub[sub["draw"] == 0].iloc[0]
        low, high = _interval(sub.loc[sub["draw"] > 0, "rho"].to_numpy(dtype=float), confidence)
        rows.append(
            {
                "alpha": alpha,
                "seed": seed,
                "measure": measure,
                "rho": float(point["rho"]),
                "ci_low": low,
                "ci_high": high,
                "levels": int(point["levels"]),
            }
        )
    return pd.DataFrame(rows)


def seed_aggregate(draws: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per α and measure of :func:`bootstrap_rho`'s draws: the mean of the seeds' ρ, its
    interval (percentiles of the per-resample mean over seeds; each seed's episodes are
    resampled independently), and the lowest and highest seed's ρ. Seeds whose ρ is
    undefined are left out. Columns ``alpha, measure, rho, ci_low, ci_high, rho_min, rho_max,
    seeds``."""
    rows = []
    for (alpha, measure), sub in draws.groupby(["alpha", "measure"], sort=False):
        by_seed = sub.pivot(index="draw", columns="seed", values="rho")  # draws x seeds
        point = by_seed.loc[0]
        means = by_seed.loc[by_seed.index > 0].mean(axis=1).to_numpy(dtype=float)
        low, high = _interval(means, confidence)
        rows.append(
            {
                "alpha": alpha,
                "measure": measure,
                "rho": float(point.mean()),
                "ci_low": low,
                "ci_high": high,
                "rho_min": float(point.min()),
                "rho_max": float(point.max()),
                "seeds": int(point.notna().sum()),
            }
        )
    return pd.DataFrame(rows)


def step_type(routes: pd.DataFrame) -> pd.Series:
    """What each step is: its action (``turn``, ``forward``, ``pickup``, ``drop``, ``toggle``,
    ``done``), or ``final approach`` for the last :data:`LAST_STEPS` steps of a successful
    episode, or ``first step``."""
    names = routes["action"].map(dict(enumerate(ACTION_NAMES)))
    kind = names.replace({"left": "turn", "right": "turn"})
    to_go = routes["episode_length"] - routes["step"]
    kind = kind.mask((routes["success"] == 1) & (to_go <= LAST_STEPS), "final approach")
    return kind.mask(routes["step"] == 0, "first step").rename("step_type")


def step_type_costs(routes: pd.DataFrame, alpha: float, seed: int = 0) -> pd.DataFrame:
    """Mean routing cost per step type (:func:`step_type`) and level, with ``alpha`` and
    ``seed``."""
    frame = routes.assign(step_type=step_type(routes), level=routes["level"].map(level_name))
    table = (
        frame.groupby(["level", "step_type"], sort=True)["cost"]
        .agg(cost_per_step="mean", steps="size")
        .reset_index()
    )
    table.insert(1, "alpha", float(alpha))
    table.insert(2, "seed", int(seed))
    return table


def _ordered_levels(summary: pd.DataFrame) -> list[str]:
    return sorted(summary["level"].unique(), key=lambda lv: (LEVEL_DIFFICULTY[lv], lv))


def _difficulty_label(value: float) -> str:
    if math.isinf(value):
        return "not reached" if value > 0 else "-inf"
    return f"{value:g}" if float(value).is_integer() else f"{value:.2f}"


def plot_cost_vs_difficulty(
    summary: pd.DataFrame,
    path: str | Path,
    difficulty: Mapping[str, float] | None = None,
    cost: str = "cost_per_step_success",
) -> Path:
    """Per-level routing cost (default: over successful episodes) against difficulty, one line
    per α: the mean over seeds, bars from the lowest to the highest seed, each seed a dot
    (mean Spearman ρ over seeds in the legend).

    Levels are placed in difficulty order (what ρ compares), labelled with their difficulty:
    the summary's rank, or ``difficulty`` (a level → value map such as
    :func:`measured_difficulty`; levels it lacks are left out).
    """
    values = (
        summary.groupby("level")["difficulty"].first().to_dict()
        if difficulty is None
        else {lv: difficulty[lv] for lv in summary["level"].unique() if lv in difficulty}
    )
    levels = sorted(values, key=lambda lv: (values[lv], LEVEL_DIFFICULTY.get(lv, 0), lv))
    rho = spearman_by_alpha(summary, cost, difficulty).groupby("alpha")["spearman_rho"].mean()
    alphas = sorted(summary["alpha"].unique())
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    x = np.arange(len(levels))
    for i, alpha in enumerate(alphas):
        offset = (i - (len(alphas) - 1) / 2) * 0.08
        table = summary[summary["alpha"] == alpha].pivot(index="level", columns="seed", values=cost)
        table = table.reindex(levels)
        mean, low, high = table.mean(axis=1), table.min(axis=1), table.max(axis=1)
        label = f"α={alpha:g}" + (f" (ρ={rho[alpha]:.2f})" if math.isfinite(rho[alpha]) else "")
        line = ax.errorbar(
            x + offset, mean, yerr=_bars(mean, low, high), marker="o", capsize=3, label=label
        )
        for seed in table.columns:
            ax.plot(x + offset, table[seed], ".", color=line[0].get_color(), alpha=0.4)
    ax.set_xticks(x)
    ax.set_xticklabels(
        [f"{lv}\n({_difficulty_label(values[lv])})" for lv in levels], rotation=20, fontsize=7
    )
    measure = "SPEC rank" if difficulty is None else "log10 frames for a GRU-64 to the threshold"
    ax.set_xlabel(f"level, easiest to hardest ({measure})")
    episodes = "successful episodes" if cost == "cost_per_step_success" else cost
    ax.set_ylabel(f"routing cost per step\n({episodes}, normalised)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _bars(mean: pd.Series, low: pd.Series, high: pd.Series) -> list[pd.Series]:
    """Error bars from the lowest to the highest seed: the mean of equal values can fall a
    rounding error outside them, which matplotlib refuses as a negative length."""
    return [(mean - low).clip(lower=0), (high - mean).clip(lower=0)]


def plot_success_vs_alpha(summary: pd.DataFrame, path: str | Path) -> Path:
    """Held-out success of each level against α (α = 0 drawn at the left edge): the mean over
    seeds, bars from the lowest to the highest seed."""
    alphas = sorted(summary["alpha"].unique())
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for level in _ordered_levels(summary):
        success = summary[summary["level"] == level].groupby("alpha")["success"]
        mean, low, high = (success.agg(f).reindex(alphas) for f in ("mean", "min", "max"))
        ax.errorbar(
            range(len(alphas)),
            mean,
            yerr=_bars(mean, low, high),
            marker="o",
            capsize=3,
            label=level,
        )
    ax.set_xticks(range(len(alphas)))
    ax.set_xticklabels([f"{a:g}" for a in alphas])
    ax.set_xlabel("α (routing-cost weight, normalised units)")
    ax.set_ylabel("held-out success")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_usage(usage: pd.DataFrame, path: str | Path) -> Path:
    """Expert usage per level (:func:`usage_table`, mean over seeds): one panel per block
    (rows) and α (columns), each level a bar stacked by its experts' mean routing weight."""
    blocks, alphas = sorted(usage["block"].unique()), sorted(usage["alpha"].unique())
    levels = sorted(usage["level"].unique(), key=lambda lv: (LEVEL_DIFFICULTY.get(lv, 0), lv))
    fig = Figure(figsize=(2.6 * len(alphas) + 1.5, 2.6 * len(blocks) + 0.8))
    axes = fig.subplots(len(blocks), len(alphas), squeeze=False, sharey=True)
    for row, block in enumerate(blocks):
        for col, alpha in enumerate(alphas):
            ax = axes[row][col]
            sub = usage[(usage["block"] == block) & (usage["alpha"] == alpha)]
            weights = sub.pivot_table(
                index="level", columns=["expert", "size"], values="mean_weight", aggfunc="mean"
            ).reindex(levels)
            bottom = np.zeros(len(levels))
            for expert, size in weights.columns:
                share = weights[(expert, size)].fillna(0).to_numpy(dtype=float)
                ax.bar(range(len(levels)), share, bottom=bottom, label=f"expert {expert} ({size})")
                bottom += share
            ax.set_title(f"block {block}, α={alpha:g}", fontsize=8)
            ax.set_xticks(range(len(levels)))
            ax.set_xticklabels(levels, rotation=60, fontsize=6, ha="right")
            if col == 0:
                ax.set_ylabel("mean routing weight")
            if col == len(alphas) - 1:
                ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    return save_figure(fig, path)


def plot_step_types(costs: pd.DataFrame, path: str | Path) -> Path:
    """Routing cost per step type, pooled over levels and seeds (step-weighted), one bar group
    per type and one bar per α."""
    pooled = costs.assign(total=costs["cost_per_step"] * costs["steps"])
    pooled = pooled.groupby(["alpha", "step_type"])[["total", "steps"]].sum()
    pooled = (pooled["total"] / pooled["steps"]).unstack("step_type")
    order = ["first step", "turn", "forward", "pickup", "drop", "toggle", "done", "final approach"]
    kinds = [k for k in order if k in pooled.columns]
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    width = 0.8 / max(len(pooled), 1)
    for i, (alpha, row) in enumerate(pooled.iterrows()):
        x = np.arange(len(kinds)) + (i - (len(pooled) - 1) / 2) * width
        ax.bar(x, row[kinds].to_numpy(dtype=float), width, label=f"α={alpha:g}")
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels(kinds, rotation=15, fontsize=8)
    ax.set_ylabel("routing cost per step (normalised)")
    ax.set_title(f"cost by step type (final approach: last {LAST_STEPS} steps of a success)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
