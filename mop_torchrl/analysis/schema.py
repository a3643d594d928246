"""Schema of the routing-analysis tables, their validation, and the helpers that fill them.

The analysis layer works from two pandas tables, so that it does not depend on how they were
recorded (a recorder running a policy in BabyAI envs fills them; :func:`synthetic_tables` makes a
fake pair for tests and examples). Store them with :func:`write_tables`: CSV, and Parquet (types
kept) when pyarrow is installed.

**Routes table** (one row per environment step; :func:`validate_routes`):

==================  =======  =======================================================================
column              dtype    meaning
==================  =======  =======================================================================
``level``           str      env id, e.g. ``"BabyAI-GoToLocal-v0"``
``mission``         str      the mission text, e.g. ``"go to the red ball"``
``mission_type``    str      ``go_to`` / ``pick_up`` / ``open`` / ``put_next`` / ``other``
                             (:func:`mission_type` of ``mission``)
``episode``         int      episode id, unique over the whole table (not only within a level)
``step``            int      step index within the episode, 0-based, unique per episode
``agent_x``         int      agent column in the grid *before* the action (0 = left wall)
``agent_y``         int      agent row in the grid *before* the action (0 = top wall)
``direction``       int      agent direction before the action: 0 right, 1 down, 2 left, 3 up
``carrying``        int      1 if the agent carries an object before the action, else 0
``action``          int      action taken (:data:`ACTION_NAMES`: 0 left ... 6 done)
``expert_action``   int      the bot's action for this step; ``-1`` = no label (bot failure)
``w{l}_{i}``        float    routing weight of expert ``i`` of block ``l`` (``config.layers[l][i]``,
                             identity experts included); each block's weights sum to 1
``cost``            float    the step's routing cost ``Σ_l Σ_i p_{l,i} d_{l,i}^2``
``event``           str      ``""`` or what the step did (:data:`EVENTS`, joined by ``"+"`` when
                             several, e.g. ``"pickup+goal_reached"``; :func:`step_event`)
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

Extra columns are allowed in both tables. Read them back with :func:`read_routes` /
:func:`read_episodes` (Parquet or CSV; plain ``pd.read_csv`` turns the empty
``event``/``frame_path`` strings into NaN, which :func:`validate_routes` rejects).

Examples:
    >>> from mop_torchrl.analysis import synthetic_tables, validate_routes, mission_type
    >>> layers = [[0, 16, 32], [32, 64]]
    >>> routes, episodes = synthetic_tables(layers, episodes_per_level=2, seed=0)
    >>> validate_routes(routes, layers)
    >>> weight_columns(layers)
    ['w0_0', 'w0_1', 'w0_2', 'w1_0', 'w1_1']
    >>> mission_type("pick up the red ball, then open a door")
    'pick_up'
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "EPISODE_COLUMNS",
    "EVENTS",
    "MISSION_TYPES",
    "ROUTE_COLUMNS",
    "block_columns",
    "mission_type",
    "parquet_available",
    "read_episodes",
    "read_routes",
    "step_event",
    "synthetic_tables",
    "validate_episodes",
    "validate_routes",
    "weight_columns",
    "write_tables",
]

#: Values of :func:`mission_type`.
MISSION_TYPES: tuple[str, ...] = ("go_to", "pick_up", "open", "put_next", "other")
#: Atomic values of the ``event`` column (several are joined by ``"+"``).
EVENTS: tuple[str, ...] = ("pickup", "drop", "toggle_door", "toggle", "goal_reached")

#: Routes-table columns other than the weight columns, with their kind
#: (``"i"`` integer, ``"f"`` number, ``"s"`` string).
ROUTE_COLUMNS: dict[str, str] = {
    "level": "s",
    "mission": "s",
    "mission_type": "s",
    "episode": "i",
    "step": "i",
    "agent_x": "i",
    "agent_y": "i",
    "direction": "i",
    "carrying": "i",
    "action": "i",
    "expert_action": "i",
    "cost": "f",
    "event": "s",
    "success": "i",
    "episode_return": "f",
    "episode_length": "i",
}
#: Episodes-table columns with their kind.
EPISODE_COLUMNS: dict[str, str] = {
    "episode": "i",
    "level": "s",
    "mission": "s",
    "grid_width": "i",
    "grid_height": "i",
    "start_room_x": "i",
    "start_room_y": "i",
    "objects": "s",
    "frame_path": "s",
}

_WEIGHT_RE = re.compile(r"^w(\d+)_(\d+)$")
# Compound missions (minigrid.envs.babyai.core.verifier): "A, then B", "A after you B", "A and B".
_SPLIT_RE = re.compile(r",?\s+(?:then|after you|and)\s+")
_CLAUSE_TYPES = (
    ("go to ", "go_to"),
    ("pick up ", "pick_up"),
    ("open ", "open"),
    ("put ", "put_next"),
)


def weight_columns(layers: Sequence[Sequence[int]]) -> list[str]:
    """All weight columns ``w{l}_{i}``, block by block, in ``layers`` order."""
    return [col for block in range(len(layers)) for col in block_columns(layers, block)]


def block_columns(layers: Sequence[Sequence[int]], block: int) -> list[str]:
    """The weight columns of one block: ``["w{block}_0", ..., "w{block}_{k-1}"]``."""
    return [f"w{block}_{i}" for i in range(len(layers[block]))]


def mission_type(mission: str, *, temporal: bool = False) -> str:
    """The type of a BabyAI mission: ``go_to``, ``pick_up``, ``open``, ``put_next`` or ``other``.

    Compound missions (``"A and B"``, ``"A, then B"``, ``"A after you B"``) take the type of
    their first clause *in the text* (``A``). With ``temporal=True`` they take the type of the
    clause that must be done first instead (``B`` for ``"A after you B"``, else ``A``).
    Text that is not a BabyAI instruction (e.g. ``"get to the green goal square"``) is ``other``.

    Examples:
        >>> mission_type("go to the red ball")
        'go_to'
        >>> mission_type("put the red key next to the blue ball")
        'put_next'
        >>> mission_type("open the door on your left after you pick up a box")
        'open'
        >>> mission_type("open the door on your left after you pick up a box", temporal=True)
        'pick_up'
    """
    text = " ".join(str(mission).lower().split())
    clauses = _SPLIT_RE.split(text)
    clause = clauses[0]
    if temporal and len(clauses) > 1 and re.search(r"\safter you\s", text):
        clause = text.split(" after you ", 1)[1]
        clause = _SPLIT_RE.split(clause)[0]
    for prefix, kind in _CLAUSE_TYPES:
        if clause.startswith(prefix):
            if kind == "put_next" and " next to " not in clause:
                return "other"
            return kind
    return "other"


def step_event(
    action: int,
    carrying_before: bool,
    carrying_after: bool,
    *,
    door_changed: bool = False,
    toggled_other: bool = False,
    success: bool = False,
) -> str:
    """The ``event`` string of one step, from the action and the state change it caused.

    Args:
        action: the action taken (minigrid ``Actions`` index, :data:`ACTION_NAMES`).
        carrying_before: whether the agent carried an object before the step.
        carrying_after: whether it carries one after the step.

    Keyword Args:
        door_changed: the cell in front of the agent is a door whose open/locked state changed.
        toggled_other: a toggle changed another object (e.g. opened a box).
        success: the step ended the episode with success.

    Returns:
        ``""`` when nothing happened, else the events joined by ``"+"``.

    Examples:
        >>> step_event(3, False, True)
        'pickup'
        >>> step_event(3, False, False)  # a failed pickup is no event
        ''
        >>> step_event(5, False, False, door_changed=True, success=True)
        'toggle_door+goal_reached'
    """
    events = []
    if action == 3 and not carrying_before and carrying_after:
        events.append("pickup")
    elif action == 4 and carrying_before and not carrying_after:
        events.append("drop")
    elif action == 5 and door_changed:
        events.append("toggle_door")
    elif action == 5 and toggled_other:
        events.append("toggle")
    if success:
        events.append("goal_reached")
    return "+".join(events)


def _kind_ok(series: pd.Series, kind: str) -> bool:
    if kind == "s":
        return bool(series.map(lambda v: isinstance(v, str)).all())
    if not pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
        return kind == "i" and pd.api.types.is_bool_dtype(series)
    if kind == "i":
        values = series.to_numpy(dtype=float)
        return bool(np.all(np.isfinite(values)) and np.all(values == np.round(values)))
    return bool(np.all(np.isfinite(series.to_numpy(dtype=float))))


def _check_columns(df: pd.DataFrame, columns: dict[str, str], table: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{table} table must be a pandas DataFrame, got {type(df).__name__}")
    missing = [col for col in columns if col not in df.columns]
    if missing:
        raise ValueError(f"{table} table is missing column(s) {missing}")
    for col, kind in columns.items():
        if df[col].isna().any():
            raise ValueError(f"{table} table column {col!r} has missing values (NaN/None)")
        if not _kind_ok(df[col], kind):
            expected = {"i": "integers", "f": "finite numbers", "s": "strings"}[kind]
            raise ValueError(
                f"{table} table column {col!r} must hold {expected} (dtype {df[col].dtype})"
            )


def validate_routes(
    df: pd.DataFrame, layers: Sequence[Sequence[int]], *, atol: float = 1e-4
) -> None:
    """Check a routes table against the schema; raise ``ValueError`` naming what is wrong.

    Checks: every column is present, non-null and of its kind; ``mission_type`` values;
    ``carrying``/``success`` are 0/1; ``expert_action >= -1``; ``(episode, step)`` unique;
    weight columns match ``layers`` exactly (none missing, none extra), lie in ``[0, 1]`` and sum
    to 1 per block within ``atol``; ``cost >= 0``; episode outcome columns constant per episode.

    Args:
        df: the routes table.
        layers: the policy's expert sizes per block (``config.layers``), e.g. ``[[0, 16, 32]]``.

    Keyword Args:
        atol: tolerance of the per-block weight sums.
    """
    _check_columns(df, ROUTE_COLUMNS, "routes")
    wcols = weight_columns(layers)
    missing = [col for col in wcols if col not in df.columns]
    if missing:
        raise ValueError(f"routes table is missing weight column(s) {missing} for layers {layers}")
    extra = [col for col in df.columns if _WEIGHT_RE.match(str(col)) and col not in wcols]
    if extra:
        raise ValueError(f"routes table has weight column(s) {extra} not in layers {layers}")
    _check_columns(df, dict.fromkeys(wcols, "f"), "routes")
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


def parquet_available() -> bool:
    """Whether ``pyarrow`` is installed (``pip install 'mop_torchrl[parquet]'``)."""
    return importlib.util.find_spec("pyarrow") is not None


def write_tables(out_dir: str | Path, **tables: pd.DataFrame) -> list[Path]:
    """Write each table as ``{name}.csv`` and, with pyarrow installed, ``{name}.parquet``.

    Parquet keeps the column types (CSV does not: integers and strings are re-inferred when
    read); CSV is always written, so nothing depends on pyarrow. Returns the paths written.

    Examples:
        >>> import tempfile
        >>> routes, episodes = synthetic_tables([[0, 16]], episodes_per_level=1, seed=0)
        >>> with tempfile.TemporaryDirectory() as out:
        ...     names = [p.name for p in write_tables(out, routes=routes, episodes=episodes)]
        ...     back = read_routes(Path(out) / "routes.parquet")
        >>> names
        ['routes.csv', 'routes.parquet', 'episodes.csv', 'episodes.parquet']
        >>> back.equals(routes)
        True
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, table in tables.items():
        paths.append(out / f"{name}.csv")
        table.to_csv(paths[-1], index=False)
        if parquet_available():
            paths.append(out / f"{name}.parquet")
            table.to_parquet(paths[-1], index=False)
    return paths


def _read_table(path: str | Path, **csv_kwargs) -> pd.DataFrame:
    if Path(path).suffix == ".parquet":
        if not parquet_available():
            raise ImportError(
                f"reading {path} needs pyarrow: pip install 'mop_torchrl[parquet]' (or read the CSV)"
            )
        return pd.read_parquet(path)
    return pd.read_csv(path, keep_default_na=False, **csv_kwargs)


def read_routes(path: str | Path) -> pd.DataFrame:
    """Read a routes table written by :func:`write_tables` (``.parquet`` or ``.csv``, by suffix).

    CSV is read with the empty ``event`` strings kept (plain ``pd.read_csv`` makes them NaN).
    """
    return _read_table(path, na_values={"cost": ["", "nan", "NaN"]})


def read_episodes(path: str | Path) -> pd.DataFrame:
    """Read an episodes table written by :func:`write_tables` (``.parquet`` or ``.csv``)."""
    return _read_table(path)


def validate_episodes(df: pd.DataFrame) -> None:
    """Check an episodes table against the schema; raise ``ValueError`` naming what is wrong.

    Checks: every column is present, non-null and of its kind; ``episode`` unique; positive grid
    sizes; ``objects`` is a JSON list.
    """
    _check_columns(df, EPISODE_COLUMNS, "episodes")
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


_MISSIONS = {
    "BabyAI-GoToLocal-v0": ("go to the {c} {t}", "go to a {t}"),
    "BabyAI-PickupLoc-v0": ("pick up the {c} {t}", "pick up a {t} on your left"),
    "BabyAI-PutNextLocal-v0": ("put the {c} {t} next to the blue ball",),
    "BabyAI-SynthSeq-v0": (
        "open a {c} door, then pick up the {c} {t}",
        "go to a {t} and open a door",
    ),
}


def synthetic_tables(
    layers: Sequence[Sequence[int]],
    *,
    levels: Sequence[str] = ("BabyAI-GoToLocal-v0", "BabyAI-PickupLoc-v0"),
    episodes_per_level: int = 3,
    grid_size: int = 8,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A fake but schema-valid ``(routes, episodes)`` pair, for tests, examples and smoke runs.

    The agent random-walks towards a target; routing weights drift with the agent's carrying
    state and the distance to the target so that plots show some structure. Nothing is rendered
    (``frame_path`` is ``""``).

    Args:
        layers: expert sizes per block.

    Keyword Args:
        levels: level names (missions are drawn from a few BabyAI templates per level).
        episodes_per_level: episodes per level.
        grid_size: grid width and height, walls included.
        seed: numpy seed.
    """
    rng = np.random.default_rng(seed)
    colors, types = ("red", "green", "blue", "purple"), ("ball", "box", "key")
    sizes = [np.asarray(block, dtype=float) for block in layers]
    rows, episodes = [], []
    episode = 0
    for level in levels:
        templates = _MISSIONS.get(level, ("go to the {c} {t}",))
        for _ in range(episodes_per_level):
            mission = str(rng.choice(templates)).format(c=rng.choice(colors), t=rng.choice(types))
            pos = rng.integers(1, grid_size - 1, size=2)
            target = rng.integers(1, grid_size - 1, size=2)
            length = int(rng.integers(6, 20))
            success = int(rng.random() < 0.8)
            ep_return = round(1 - 0.9 * length / 64, 4) if success else 0.0
            logits = [rng.normal(size=len(block)) for block in layers]
            carrying, direction = 0, int(rng.integers(4))
            for step in range(length):
                dist = float(np.abs(pos - target).sum())
                weights, cost = [], 0.0
                for block, (logit, size) in enumerate(zip(logits, sizes)):
                    drift = np.linspace(-1, 1, len(size)) * (0.3 * dist - 1 + 1.5 * carrying)
                    z = logit + drift + 0.3 * rng.normal(size=len(size)) + 0.2 * block
                    p = np.exp(z - z.max())
                    p /= p.sum()
                    weights.append(p)
                    cost += float((p * size**2).sum())
                last = step == length - 1
                action = (
                    6 if last else int(rng.choice(7, p=[0.2, 0.2, 0.45, 0.05, 0.03, 0.05, 0.02]))
                )
                before = carrying
                if action == 3 and not carrying and rng.random() < 0.5:
                    carrying = 1
                elif action == 4 and carrying:
                    carrying = 0
                event = step_event(
                    action,
                    bool(before),
                    bool(carrying),
                    door_changed=action == 5 and rng.random() < 0.5,
                    success=bool(last and success),
                )
                row = {
                    "level": level,
                    "mission": mission,
                    "mission_type": mission_type(mission),
                    "episode": episode,
                    "step": step,
                    "agent_x": int(pos[0]),
                    "agent_y": int(pos[1]),
                    "direction": direction,
                    "carrying": before,
                    "action": action,
                    "expert_action": -1 if rng.random() < 0.05 else int(rng.integers(7)),
                }
                for block, p in enumerate(weights):
                    row.update({f"w{block}_{i}": float(v) for i, v in enumerate(p)})
                row.update(
                    cost=cost,
                    event=event,
                    success=success,
                    episode_return=ep_return,
                    episode_length=length,
                )
                rows.append(row)
                if action in (0, 1):
                    direction = (direction + (1 if action == 1 else -1)) % 4
                elif action == 2:  # minigrid directions: 0 right, 1 down, 2 left, 3 up
                    step_xy = ((1, 0), (0, 1), (-1, 0), (0, -1))[direction]
                    pos = np.clip(pos + np.asarray(step_xy), 1, grid_size - 2)
            objects = [
                {
                    "type": str(rng.choice(types)),
                    "color": str(rng.choice(colors)),
                    "x": int(target[0]),
                    "y": int(target[1]),
                }
            ]
            episodes.append(
                {
                    "episode": episode,
                    "level": level,
                    "mission": mission,
                    "grid_width": grid_size,
                    "grid_height": grid_size,
                    "start_room_x": -1,
                    "start_room_y": -1,
                    "objects": json.dumps(objects),
                    "frame_path": "",
                }
            )
            episode += 1
    return pd.DataFrame(rows), pd.DataFrame(episodes)
