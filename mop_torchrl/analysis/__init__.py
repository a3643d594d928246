"""Routing analysis from recorded tables: schema, summaries and plots.

The recorder (:func:`~mop_torchrl.analysis.record.record_routes`, which runs a policy in BabyAI
envs) writes a per-step *routes* table and a per-episode *episodes* table (schema:
:mod:`mop_torchrl.analysis.schema`); everything else here works from those pandas DataFrames, so
it does not depend on the envs or the policy. ``record_routes`` and ``sweep_ablation``
(:mod:`mop_torchrl.analysis.record`) are imported from here lazily, on first use.

Examples:
    >>> from mop_torchrl.analysis import summarise, synthetic_tables, validate_routes
    >>> layers = [[0, 16, 32], [32, 64]]
    >>> routes, episodes = synthetic_tables(layers, episodes_per_level=2)
    >>> validate_routes(routes, layers)
    >>> sorted(summarise(routes, layers))
    ['cost', 'entropy', 'utilisation']
"""

from mop_torchrl.analysis.plots import (
    ABLATION_COLUMNS,
    plot_ablation,
    plot_all,
    plot_cost,
    plot_entropy,
    plot_spatial,
    plot_timeline,
    plot_utilisation,
)
from mop_torchrl.analysis.schema import (
    EPISODE_COLUMNS,
    EVENTS,
    MISSION_TYPES,
    ROUTE_COLUMNS,
    block_columns,
    mission_type,
    parquet_available,
    read_episodes,
    read_routes,
    step_event,
    synthetic_tables,
    validate_episodes,
    validate_routes,
    weight_columns,
    write_tables,
)
from mop_torchrl.analysis.summary import (
    cost_summary,
    entropy,
    entropy_summary,
    format_markdown,
    summarise,
    utilisation,
    write_summary,
)
from mop_torchrl.babyai.levels import ACTION_NAMES

__all__ = [
    "ABLATION_COLUMNS",
    "ACTION_NAMES",
    "EPISODE_COLUMNS",
    "EVENTS",
    "MISSION_TYPES",
    "ROUTE_COLUMNS",
    "block_columns",
    "cost_summary",
    "entropy",
    "entropy_summary",
    "format_markdown",
    "mission_type",
    "parquet_available",
    "plot_ablation",
    "plot_all",
    "plot_cost",
    "plot_entropy",
    "plot_spatial",
    "plot_timeline",
    "plot_utilisation",
    "read_episodes",
    "read_routes",
    "step_event",
    "summarise",
    "synthetic_tables",
    "utilisation",
    "validate_episodes",
    "validate_routes",
    "weight_columns",
    "write_summary",
    "write_tables",
]

_LAZY = {"record_routes", "sweep_ablation"}  # need torch and the envs: imported on first use


def __getattr__(name: str):
    if name in _LAZY:
        from mop_torchrl.analysis import record

        return getattr(record, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
