"""Do pathways track difficulty? Per-level routing cost of multi-level policies across α.

A multi-level MoP policy is trained once per routing-cost weight α
(``benchmarks/pathways.py``); its greedy held-out episodes on every level are recorded as a
routes table (:func:`~mop_torchrl.analysis.record.record_routes`). From those tables this
module builds the sweep's summary (one row per level and α: success, mean routing cost per step
in the config's normalised units, difficulty rank from :data:`~mop_torchrl.babyai.levels.
LEVEL_DIFFICULTY`), the Spearman correlation of cost with difficulty for each α, the cost per
step type (turns, moves, object interactions, the last steps before the goal) and the figures.

Examples:
    Two episodes on each of three levels (the columns the summary reads; a recorded routes
    table has them all):

    >>> import pandas as pd
    >>> from mop_torchrl.analysis.pathways import level_summary, spearman_by_alpha
    >>> levels = ["BabyAI-GoToRedBall-v0", "BabyAI-GoToLocal-v0", "BabyAI-PickupLoc-v0"]
    >>> routes = pd.DataFrame({"level": [lv for lv in levels for _ in range(2)],
    ...                        "episode": range(6), "success": [1, 1, 1, 0, 0, 1],
    ...                        "cost": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})
    >>> summary = level_summary(routes, alpha=0.01)
    >>> summary[["level", "success", "cost_per_step", "difficulty"]].values.tolist()
    [['GoToRedBall', 1.0, 1.5, 2], ['GoToLocal', 0.5, 3.5, 3], ['PickupLoc', 0.5, 5.5, 4]]
    >>> spearman_by_alpha(summary)[["alpha", "spearman_rho", "levels"]].values.tolist()
    [[0.01, 1.0, 3.0]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from mop_torchrl.analysis.plots import save_figure
from mop_torchrl.analysis.summary import utilisation
from mop_torchrl.babyai.levels import ACTION_NAMES, LEVEL_DIFFICULTY, level_name

__all__ = [
    "SUMMARY_COLUMNS",
    "level_summary",
    "plot_cost_vs_difficulty",
    "plot_step_types",
    "plot_success_vs_alpha",
    "spearman_by_alpha",
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
    "difficulty": "difficulty rank of the level (SPEC order; ties share a rank)",
    "episodes": "held-out episodes recorded",
    "steps": "steps recorded",
}
"""Columns of the pathway summary CSV, in order, with their meaning."""

LAST_STEPS = 3
"""Steps before the end of a successful episode counted as ``"final approach"``."""


def level_summary(routes: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """One row per level of a routes table: success, cost per step, difficulty (validated).

    Levels outside :data:`~mop_torchrl.babyai.levels.LEVEL_DIFFICULTY` are refused: their rank is
    not agreed.
    """
    rows = []
    for level, sub in routes.groupby("level", sort=False):
        episodes = sub.groupby("episode").first()
        name = level_name(str(level))
        rows.append(
            {
                "level": name,
                "alpha": float(alpha),
                "success": float(episodes["success"].mean()),
                "cost_per_step": float(sub["cost"].mean()),
                "difficulty": LEVEL_DIFFICULTY.get(name, -1),
                "episodes": len(episodes),
                "steps": len(sub),
            }
        )
    summary = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    validate_summary(summary)
    return summary


def validate_summary(summary: pd.DataFrame) -> None:
    """Checks a pathway summary against :data:`SUMMARY_COLUMNS`.

    Raises:
        ValueError: naming the first problem (missing column, level without a difficulty
            rank, rate outside [0, 1], negative or non-finite cost, repeated level × α).
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
    for column in ("alpha", "cost_per_step"):
        values = summary[column].to_numpy(dtype=float)
        if not (np.isfinite(values).all() and (values >= 0).all()):
            raise ValueError(f"column {column!r} must be finite and >= 0")
    if (summary["episodes"] <= 0).any() or (summary["steps"] < summary["episodes"]).any():
        raise ValueError("columns 'episodes' must be > 0 and 'steps' >= 'episodes'")
    if summary.duplicated(["level", "alpha"]).any():
        raise ValueError("pathway summary repeats a (level, alpha) pair")


def write_summary_csv(summary: pd.DataFrame, path: str | Path) -> Path:
    """Validates ``summary`` and writes it as CSV (columns in :data:`SUMMARY_COLUMNS` order)."""
    validate_summary(summary)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary[list(SUMMARY_COLUMNS)].to_csv(path, index=False, float_format="%.6g")
    return path


def usage_table(
    routes: pd.DataFrame, layers: Sequence[Sequence[int]], alpha: float
) -> pd.DataFrame:
    """Per level, block and expert: mean routing weight and argmax share, with ``alpha``."""
    table = utilisation(routes, layers).query("mission_type == 'all' and level != 'all'").copy()
    table["level"] = table["level"].map(level_name)
    table.insert(1, "alpha", float(alpha))
    return table.drop(columns="mission_type").reset_index(drop=True)


def spearman_by_alpha(summary: pd.DataFrame) -> pd.DataFrame:
    """Spearman ρ between per-level cost per step and difficulty rank, for each α.

    ρ is NaN where fewer than 3 levels or a constant cost make it undefined.
    """
    rows = []
    for alpha, sub in summary.groupby("alpha", sort=True):
        rho = float("nan")
        if len(sub) >= 3 and sub["cost_per_step"].nunique() > 1:
            rho = float(sub[["cost_per_step", "difficulty"]].corr(method="spearman").iloc[0, 1])
        rows.append(
            {
                "alpha": float(alpha),
                "spearman_rho": rho,
                "levels": len(sub),
                "mean_success": float(sub["success"].mean()),
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


def step_type_costs(routes: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Mean routing cost per step type (:func:`step_type`) and level, with ``alpha``."""
    frame = routes.assign(step_type=step_type(routes), level=routes["level"].map(level_name))
    table = (
        frame.groupby(["level", "step_type"], sort=True)["cost"]
        .agg(cost_per_step="mean", steps="size")
        .reset_index()
    )
    table.insert(1, "alpha", float(alpha))
    return table


def _ordered_levels(summary: pd.DataFrame) -> list[str]:
    return sorted(summary["level"].unique(), key=lambda lv: (LEVEL_DIFFICULTY[lv], lv))


def plot_cost_vs_difficulty(summary: pd.DataFrame, path: str | Path) -> Path:
    """Routing cost per step of each level against its difficulty rank, one line per α
    (Spearman ρ in the legend)."""
    levels = _ordered_levels(summary)
    rho = spearman_by_alpha(summary).set_index("alpha")["spearman_rho"]
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for alpha, sub in summary.groupby("alpha", sort=True):
        sub = sub.set_index("level").reindex(levels)
        label = f"α={alpha:g} (ρ={rho[alpha]:.2f})" if math.isfinite(rho[alpha]) else f"α={alpha:g}"
        ax.plot(range(len(levels)), sub["cost_per_step"], marker="o", label=label)
    ax.set_xticks(range(len(levels)))
    ax.set_xticklabels(levels, rotation=20, fontsize=8)
    ax.set_xlabel("level, easiest to hardest (SPEC difficulty order)")
    ax.set_ylabel("routing cost per step (normalised)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_success_vs_alpha(summary: pd.DataFrame, path: str | Path) -> Path:
    """Held-out success of each level against α (α = 0 drawn at the left edge)."""
    alphas = sorted(summary["alpha"].unique())
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for level in _ordered_levels(summary):
        sub = summary[summary["level"] == level].set_index("alpha").reindex(alphas)
        ax.plot(range(len(alphas)), sub["success"], marker="o", label=level)
    ax.set_xticks(range(len(alphas)))
    ax.set_xticklabels([f"{a:g}" for a in alphas])
    ax.set_xlabel("α (routing-cost weight, normalised units)")
    ax.set_ylabel("held-out success")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_step_types(costs: pd.DataFrame, path: str | Path) -> Path:
    """Routing cost per step type, pooled over levels (step-weighted), one bar group per type
    and one bar per α."""
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
