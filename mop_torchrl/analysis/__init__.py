"""Routing analysis from recorded tables: schema, storage, summaries and plots.

The recorder (:func:`~mop_torchrl.analysis.record.record_routes`, which runs a policy in BabyAI
envs) writes a per-step *routes* table and a per-episode *episodes* table (their pyarrow
schemas and validation: :mod:`mop_torchrl.analysis.schema`; files:
:mod:`mop_torchrl.analysis.tables`); everything else here works from those pandas DataFrames, so
it does not depend on the envs or the policy. ``record_routes`` and ``sweep_ablation``
(:mod:`mop_torchrl.analysis.record`) are imported from here lazily, on first use.

Examples:
    A two-step episode of a policy with one block of two experts (an identity expert and one of
    16 units, so the routing cost of a step is ``w0_1 * 16**2``):

    >>> import pandas as pd
    >>> from mop_torchrl.analysis import summarise, validate_routes
    >>> layers = [[0, 16]]
    >>> routes = pd.DataFrame({
    ...     "level": "BabyAI-GoToRedBall-v0", "mission": "go to the red ball",
    ...     "mission_type": "go_to", "episode": 0, "step": [0, 1], "agent_x": [1, 2],
    ...     "agent_y": 1, "direction": 0, "carrying": 0, "action": [2, 6],
    ...     "expert_action": [2, 6], "w0_0": [0.875, 0.25], "w0_1": [0.125, 0.75],
    ...     "cost": [32.0, 192.0], "event": ["", "goal_reached"], "success": 1,
    ...     "episode_return": 0.97, "episode_length": 2,
    ... })
    >>> validate_routes(routes, layers)
    >>> tables = summarise(routes, layers)
    >>> sorted(tables), float(tables["cost"].loc[0, "mean_cost"])
    (['cost', 'entropy', 'utilisation'], 112.0)
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
    EPISODES_SCHEMA,
    ROUTES_SCHEMA,
    block_columns,
    routes_schema,
    validate_episodes,
    validate_routes,
    weight_columns,
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
from mop_torchrl.analysis.tables import read_episodes, read_routes, write_tables
from mop_torchrl.babyai.levels import ACTION_NAMES
from mop_torchrl.babyai.semantics import EVENTS, MISSION_TYPES, mission_type, step_event

__all__ = [
    "ABLATION_COLUMNS",
    "ACTION_NAMES",
    "EPISODES_SCHEMA",
    "EVENTS",
    "MISSION_TYPES",
    "ROUTES_SCHEMA",
    "block_columns",
    "cost_summary",
    "entropy",
    "entropy_summary",
    "format_markdown",
    "mission_type",
    "plot_ablation",
    "plot_all",
    "plot_cost",
    "plot_entropy",
    "plot_spatial",
    "plot_timeline",
    "plot_utilisation",
    "read_episodes",
    "read_routes",
    "routes_schema",
    "step_event",
    "summarise",
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
