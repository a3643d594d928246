"""Routing summaries of a routes table (schema in :mod:`mop_torchrl.analysis.schema`).

Every statistic is computed over steps (each recorded step weighs the same), for every group of
four groupings: the whole table (``level == mission_type == "all"``), per level
(``mission_type == "all"``), per mission type (``level == "all"``), and per level × mission type.

Examples:
    Four steps of two one-episode levels, for a policy with one block of two experts (the
    columns the summaries read; a recorded table has them all):

    >>> import pandas as pd
    >>> from mop_torchrl.analysis import summarise
    >>> layers = [[0, 16]]
    >>> routes = pd.DataFrame({
    ...     "level": ["A", "A", "B", "B"], "mission_type": ["go_to", "go_to", "pick_up", "pick_up"],
    ...     "episode": [0, 0, 1, 1], "w0_0": [0.875, 0.25, 0.5, 0.5],
    ...     "w0_1": [0.125, 0.75, 0.5, 0.5], "cost": [32.0, 192.0, 128.0, 128.0],
    ...     "success": [1, 1, 0, 0],
    ... })
    >>> tables = summarise(routes, layers)
    >>> sorted(tables)
    ['cost', 'entropy', 'utilisation']
    >>> overall = tables["utilisation"].query("level == 'all' and mission_type == 'all'")
    >>> overall["argmax_share"].tolist()  # one row per (block, expert); ties go to expert 0
    [0.75, 0.25]
    >>> float(tables["cost"].set_index(["level", "mission_type"]).loc[("A", "all"), "mean_cost"])
    112.0
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mop_torchrl.analysis.schema import block_columns

__all__ = [
    "ALL",
    "cost_summary",
    "entropy",
    "entropy_summary",
    "format_markdown",
    "summarise",
    "utilisation",
    "write_summary",
]

#: Group label meaning "all values of this column".
ALL = "all"


def entropy(weights: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats of distributions along ``axis`` (``0 log 0 = 0``).

    Examples:
        >>> float(entropy(np.array([0.5, 0.5])).round(4))
        0.6931
    """
    w = np.clip(np.asarray(weights, dtype=float), 0.0, None)
    logs = np.log(np.where(w > 0, w, 1.0))
    return -(w * logs).sum(axis=axis)


def _groups(df: pd.DataFrame) -> Iterator[tuple[str, str, pd.DataFrame]]:
    yield ALL, ALL, df
    for level, sub in df.groupby("level", sort=True):
        yield str(level), ALL, sub
    for kind, sub in df.groupby("mission_type", sort=True):
        yield ALL, str(kind), sub
    for (level, kind), sub in df.groupby(["level", "mission_type"], sort=True):
        yield str(level), str(kind), sub


def utilisation(df: pd.DataFrame, layers: Sequence[Sequence[int]]) -> pd.DataFrame:
    """Per-block expert utilisation for every group.

    Returns:
        Columns ``level, mission_type, block, expert, size, mean_weight, argmax_share, n_steps``:
        ``mean_weight`` is the expert's mean routing weight, ``argmax_share`` the fraction of
        steps where it has the block's largest weight (ties go to the lower index).
    """
    rows = []
    for level, kind, sub in _groups(df):
        for block, sizes in enumerate(layers):
            w = sub[block_columns(layers, block)].to_numpy(dtype=float)
            share = np.bincount(w.argmax(axis=1), minlength=len(sizes)) / max(len(w), 1)
            mean = w.mean(axis=0)
            for expert, size in enumerate(sizes):
                rows.append(
                    {
                        "level": level,
                        "mission_type": kind,
                        "block": block,
                        "expert": expert,
                        "size": int(size),
                        "mean_weight": float(mean[expert]),
                        "argmax_share": float(share[expert]),
                        "n_steps": len(w),
                    }
                )
    return pd.DataFrame(rows)


def entropy_summary(df: pd.DataFrame, layers: Sequence[Sequence[int]]) -> pd.DataFrame:
    """Per-block routing entropy (nats) for every group.

    Returns:
        Columns ``level, mission_type, block, mean_entropy, entropy_of_mean, max_entropy,
        n_steps``: ``mean_entropy`` is the mean per-step entropy (how soft each decision is),
        ``entropy_of_mean`` the entropy of the mean distribution (how evenly experts are used
        overall), ``max_entropy = log k``.
    """
    rows = []
    for level, kind, sub in _groups(df):
        for block, sizes in enumerate(layers):
            w = sub[block_columns(layers, block)].to_numpy(dtype=float)
            rows.append(
                {
                    "level": level,
                    "mission_type": kind,
                    "block": block,
                    "mean_entropy": float(entropy(w).mean()),
                    "entropy_of_mean": float(entropy(w.mean(axis=0))),
                    "max_entropy": float(np.log(len(sizes))),
                    "n_steps": len(w),
                }
            )
    return pd.DataFrame(rows)


def cost_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Routing cost and outcome per group.

    Returns:
        Columns ``level, mission_type, mean_cost, std_cost, n_steps, n_episodes,
        success_rate`` (``success_rate`` over episodes).
    """
    rows = []
    for level, kind, sub in _groups(df):
        outcome = sub.groupby("episode")["success"].first()
        rows.append(
            {
                "level": level,
                "mission_type": kind,
                "mean_cost": float(sub["cost"].mean()),
                "std_cost": float(sub["cost"].std(ddof=0)),
                "n_steps": len(sub),
                "n_episodes": len(outcome),
                "success_rate": float(outcome.mean()),
            }
        )
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame, layers: Sequence[Sequence[int]]) -> dict[str, pd.DataFrame]:
    """All summaries of a routes table: ``{"utilisation", "entropy", "cost"}`` DataFrames.

    See :func:`utilisation`, :func:`entropy_summary` and :func:`cost_summary`. The table is not
    validated here; call :func:`~mop_torchrl.analysis.validate_routes` first.
    """
    return {
        "utilisation": utilisation(df, layers),
        "entropy": entropy_summary(df, layers),
        "cost": cost_summary(df),
    }


def format_markdown(df: pd.DataFrame, *, floatfmt: str = ".4g") -> str:
    """A DataFrame as a GitHub markdown table (no ``tabulate`` needed).

    Examples:
        >>> print(format_markdown(pd.DataFrame({"a": [1], "b": [0.5]})))
        | a | b |
        |---|---|
        | 1 | 0.5 |
    """

    def cell(value: object) -> str:
        if isinstance(value, float | np.floating):
            return format(float(value), floatfmt)
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, df.columns)) + " |"]
    lines.append("|" + "|".join("---" for _ in df.columns) + "|")
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def write_summary(tables: dict[str, pd.DataFrame], out_dir: str | Path) -> list[Path]:
    """Write each table as ``{name}.csv`` and all of them in ``summary.md``; return the paths.

    Args:
        tables: the output of :func:`summarise` (any ``{name: DataFrame}`` works).
        out_dir: the folder, created if missing.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, sections = [], ["# Routing summary", ""]
    for name, table in tables.items():
        path = out / f"{name}.csv"
        table.to_csv(path, index=False)
        paths.append(path)
        sections += [f"## {name}", "", format_markdown(table), ""]
    md = out / "summary.md"
    md.write_text("\n".join(sections))
    paths.append(md)
    return paths
