"""Schema of the routing-analysis tables (as :mod:`pyarrow` schemas) and their validation.

The analysis layer works from two pandas tables, so that it does not depend on how they were
recorded (:func:`~mop_torchrl.analysis.record.record_routes` runs a policy in BabyAI envs to
fill them). Their column types are the pyarrow schemas :func:`routes_schema` and
:data:`EPISODES_SCHEMA`; :func:`validate_routes` / :func:`validate_episodes` check a table's
columns against them (via pyarrow's own conversion) and then the meaning of the values. Store
and read them with :mod:`mop_torchrl.analysis.tables` (Parquet keeps the types, CSV beside it).

**Routes table** (one row per environment step; :func:`validate_routes`):

==================  =======  =======================================================================
column              dtype    meaning
==================  =======  =======================================================================
``level``           str      env id, e.g. ``"BabyAI-GoToLocal-v0"``
``mission``         str      the mission text, e.g. ``"go to the red ball"``
``mission_type``    str      ``go_to`` / ``pick_up`` / ``open`` / ``put_next`` / ``other``
                             (:func:`~mop_torchrl.babyai.semantics.mission_type`)
``episode``         int      episode id, unique over the whole table (not only within a level)
``step``            int      step index within the episode, 0-based, unique per episode
``agent_x``         int      agent column in the grid *before* the action (0 = left wall)
``agent_y``         int      agent row in the grid *before* the action (0 = top wall)
``direction``       int      agent direction before the action: 0 right, 1 down, 2 left, 3 up
``carrying``        int      1 if the agent carries an object before the action, else 0
``action``          int      action taken (:data:`~mop_torchrl.babyai.levels.ACTION_NAMES`)
``expert_action``   int      the bot's action for this step; ``-1`` = no label (bot failure)
``w{l}_{i}``        float    routing weight of expert ``i`` of block ``l`` (``config.layers[l][i]``,
                             identity experts included); each block's weights sum to 1
``cost``            float    the step's routing cost ``Σ_l Σ_i p_{l,i} d_{l,i}^2``
``event``           str      ``""`` or what the step did (``EVENTS`` joined by ``"+"`` when several,
                             e.g. ``"pickup+goal_reached"``; :mod:`~mop_torchrl.babyai.semantics`)
``success``         int      1 if the episode reached its goal (same value on all its rows)
``episode_return``  float    the episode's return (same value on all its rows)
``episode_length``  int      the episode's number of steps (same value on all its rows)
==================  =======  =======================================================================

**Episodes table** (one row per episode; :func:`validate_episodes`):

==================  =======  =======================================================================
column              dtype    meaning
==================  =======  =======================================================================
``episode``         int      episode id (the routes table's ``episode``), unique
``level``           str      env id
``mission``         str      mission text
``grid_width``      int      grid width in cells (walls included)
``grid_height``     int      grid height in cells (walls included)
``start_room_x``    int      column index of the room the agent starts in; ``-1`` if no rooms
``start_room_y``    int      row index of that room; ``-1`` if no rooms
``objects``         str      JSON list of ``{"type", "color", "x", "y"}`` (doors included) at reset
``frame_path``      str      path of the rendered first frame (PNG, whole grid); ``""`` if none
==================  =======  =======================================================================

Extra columns are allowed in both tables.

Examples:
    >>> from mop_torchrl.analysis.schema import routes_schema, weight_columns
    >>> layers = [[0, 16, 32], [32, 64]]
    >>> weight_columns(layers)
    ['w0_0', 'w0_1', 'w0_2', 'w1_0', 'w1_1']
    >>> routes_schema(layers).field("w1_0").type, routes_schema(layers).field("level").type
    (DataType(double), DataType(string))
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mop_torchrl.babyai.semantics import MISSION_TYPES

__all__ = [
    "EPISODES_SCHEMA",
    "ROUTES_SCHEMA",
    "block_columns",
    "routes_schema",
    "validate_episodes",
    "validate_routes",
    "weight_columns",
]


def _schema(**columns: pa.DataType) -> pa.Schema:
    return pa.schema([pa.field(name, kind, nullable=False) for name, kind in columns.items()])


#: Routes-table columns other than the weight columns (:func:`routes_schema` adds those).
ROUTES_SCHEMA: pa.Schema = _schema(
    level=pa.string(),
    mission=pa.string(),
    mission_type=pa.string(),
    episode=pa.int64(),
    step=pa.int64(),
    agent_x=pa.int64(),
    agent_y=pa.int64(),
    direction=pa.int64(),
    carrying=pa.int64(),
    action=pa.int64(),
    expert_action=pa.int64(),
    cost=pa.float64(),
    event=pa.string(),
    success=pa.int64(),
    episode_return=pa.float64(),
    episode_length=pa.int64(),
)
#: Episodes-table columns.
EPISODES_SCHEMA: pa.Schema = _schema(
    episode=pa.int64(),
    level=pa.string(),
    mission=pa.string(),
    grid_width=pa.int64(),
    grid_height=pa.int64(),
    start_room_x=pa.int64(),
    start_room_y=pa.int64(),
    objects=pa.string(),
    frame_path=pa.string(),
)

_WEIGHT_RE = re.compile(r"^w(\d+)_(\d+)$")


def weight_columns(layers: Sequence[Sequence[int]]) -> list[str]:
    """All weight columns ``w{l}_{i}``, block by block, in ``layers`` order."""
    return [col for block in range(len(layers)) for col in block_columns(layers, block)]


def block_columns(layers: Sequence[Sequence[int]], block: int) -> list[str]:
    """The weight columns of one block: ``["w{block}_0", ..., "w{block}_{k-1}"]``."""
    return [f"w{block}_{i}" for i in range(len(layers[block]))]


def routes_schema(layers: Sequence[Sequence[int]]) -> pa.Schema:
    """The routes table's schema for a policy with expert sizes ``layers`` (``config.layers``):
    :data:`ROUTES_SCHEMA` with the float weight columns before ``cost``."""
    schema, at = ROUTES_SCHEMA, ROUTES_SCHEMA.get_field_index("cost")
    for offset, col in enumerate(weight_columns(layers)):
        schema = schema.insert(at + offset, pa.field(col, pa.float64(), nullable=False))
    return schema


def _fits(values: pa.Array, kind: pa.DataType) -> bool:
    """Whether a column pyarrow converted as ``values`` holds values of the field type ``kind``
    (strings only as strings; integers also as bools or integral floats; floats finite)."""
    have = values.type
    if pa.types.is_null(have):  # an empty column: no value to disagree
        return len(values) == 0
    if pa.types.is_string(kind):
        return pa.types.is_string(have) or pa.types.is_large_string(have)
    numeric = pa.types.is_integer(have) or pa.types.is_floating(have)
    if pa.types.is_integer(kind) and (pa.types.is_boolean(have) or pa.types.is_integer(have)):
        return True
    if not numeric:
        return False
    try:
        converted = values.cast(kind, safe=True)  # 1.5 or inf -> int64 fails here
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return not pa.types.is_floating(kind) or bool(pc.all(pc.is_finite(converted)).as_py())


_KIND_NAMES = {"string": "strings", "int64": "integers", "double": "finite numbers"}


def _check_columns(df: pd.DataFrame, schema: pa.Schema, table: str) -> None:
    """Every field of ``schema`` is a column of ``df``, without missing values, of its type."""
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{table} table must be a pandas DataFrame, got {type(df).__name__}")
    missing = [name for name in schema.names if name not in df.columns]
    if missing:
        raise ValueError(f"{table} table is missing column(s) {missing}")
    for field in schema:
        series = df[field.name]
        try:
            values = pa.array(series, from_pandas=True)  # NaN/None become nulls
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed Python objects
            values = None
        if values is not None and values.null_count:
            raise ValueError(f"{table} table column {field.name!r} has missing values (NaN/None)")
        if values is None or not _fits(values, field.type):
            raise ValueError(
                f"{table} table column {field.name!r} must hold {_KIND_NAMES[str(field.type)]} "
                f"(dtype {series.dtype})"
            )


def validate_routes(
    df: pd.DataFrame, layers: Sequence[Sequence[int]], *, atol: float = 1e-4
) -> None:
    """Check a routes table against :func:`routes_schema`; raise ``ValueError`` naming what is
    wrong.

    Checks: every column is present, non-null and of its type; no weight column beyond
    ``layers``; ``mission_type`` values; ``carrying``/``success`` are 0/1;
    ``expert_action >= -1``; ``(episode, step)`` unique; weights lie in ``[0, 1]`` and sum to 1
    per block within ``atol``; ``cost >= 0``; episode outcome columns constant per episode.

    Args:
        df: the routes table.
        layers: the policy's expert sizes per block (``config.layers``), e.g. ``[[0, 16, 32]]``.

    Keyword Args:
        atol: tolerance of the per-block weight sums.
    """
    _check_columns(df, ROUTES_SCHEMA, "routes")
    wcols = weight_columns(layers)
    missing = [col for col in wcols if col not in df.columns]
    if missing:
        raise ValueError(f"routes table is missing weight column(s) {missing} for layers {layers}")
    extra = [col for col in df.columns if _WEIGHT_RE.match(str(col)) and col not in wcols]
    if extra:
        raise ValueError(f"routes table has weight column(s) {extra} not in layers {layers}")
    _check_columns(df, routes_schema(layers), "routes")
    bad = sorted(set(df["mission_type"]) - set(MISSION_TYPES))
    if bad:
        raise ValueError(
            f"routes column 'mission_type' has unknown value(s) {bad}; "
            f"expected one of {list(MISSION_TYPES)}"
        )
    for col in ("carrying", "success"):
        if not df[col].astype(int).isin([0, 1]).all():
            raise ValueError(f"routes column {col!r} must be 0 or 1")
    if (df["expert_action"] < -1).any():
        raise ValueError("routes column 'expert_action' must be >= -1 (-1 = no bot label)")
    if (df["cost"] < 0).any():
        raise ValueError("routes column 'cost' must be >= 0")
    dup = df.duplicated(["episode", "step"])
    if dup.any():
        row = df.loc[dup].iloc[0]
        raise ValueError(
            f"routes table has duplicate (episode, step) = ({row['episode']}, {row['step']})"
        )
    for block in range(len(layers)):
        cols = block_columns(layers, block)
        weights = df[cols].to_numpy(dtype=float)
        if ((weights < -atol) | (weights > 1 + atol)).any():
            raise ValueError(f"routes weight columns {cols} (block {block}) must lie in [0, 1]")
        err = np.abs(weights.sum(axis=1) - 1.0)
        if len(err) and err.max() > atol:
            i = int(err.argmax())
            raise ValueError(
                f"routes weight columns {cols} (block {block}) must sum to 1 per step "
                f"(within {atol}); row {df.index[i]} sums to {weights[i].sum():.6g}"
            )
    per_episode = df.groupby("episode")[["success", "episode_return", "episode_length"]].nunique()
    for col in per_episode.columns:
        varying = per_episode.index[per_episode[col] > 1]
        if len(varying):
            raise ValueError(
                f"routes column {col!r} must be constant within an episode; "
                f"episode {varying[0]} has several values"
            )


def validate_episodes(df: pd.DataFrame) -> None:
    """Check an episodes table against :data:`EPISODES_SCHEMA`; raise ``ValueError`` naming
    what is wrong.

    Checks: every column is present, non-null and of its type; ``episode`` unique; positive grid
    sizes; ``objects`` is a JSON list.
    """
    _check_columns(df, EPISODES_SCHEMA, "episodes")
    if df["episode"].duplicated().any():
        raise ValueError("episodes column 'episode' must be unique")
    if ((df["grid_width"] <= 0) | (df["grid_height"] <= 0)).any():
        raise ValueError("episodes columns 'grid_width'/'grid_height' must be positive")
    for episode, text in zip(df["episode"], df["objects"]):
        try:
            ok = isinstance(json.loads(text), list)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            raise ValueError(
                f"episodes column 'objects' must be a JSON list; episode {episode} has {text!r}"
            )
