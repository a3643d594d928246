"""BabyAI level names, their resolution and difficulty order, and the action set.

No env is built here: gymnasium and minigrid are imported only to list the registered ids.

The order is the one of the published imitation baselines (demos BabyAI 1.0 needed to reach 99%
success); the distractor-free and grey variants of GoToRedBall are easier than it and tie with
each other. The pathway analysis (:mod:`mop_torchrl.analysis.pathways`) correlates routing cost
with this rank.

Examples:
    >>> from mop_torchrl.babyai.levels import LEVEL_DIFFICULTY, level_name
    >>> level_name("BabyAI-PickupLoc-v0"), LEVEL_DIFFICULTY["PickupLoc"]
    ('PickupLoc', 4)
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence

__all__ = [
    "ACTION_NAMES",
    "LEVEL_DIFFICULTY",
    "NUM_ACTIONS",
    "babyai_levels",
    "level_name",
    "parse_level_weights",
    "resolve_level",
    "resolve_levels",
]

ACTION_NAMES: tuple[str, ...] = ("left", "right", "forward", "pickup", "drop", "toggle", "done")
"""minigrid's ``Actions``, in index order: the action set of every BabyAI level."""

NUM_ACTIONS: int = len(ACTION_NAMES)

LEVEL_DIFFICULTY: dict[str, int] = {
    "GoToRedBallNoDists": 1,
    "GoToRedBallGrey": 1,
    "GoToRedBall": 2,
    "GoToLocal": 3,
    "PickupLoc": 4,
    "PutNextLocal": 5,
    "GoTo": 6,
}
"""Difficulty rank of the levels with an agreed order (ties share a rank), by short name."""


def level_name(level: str) -> str:
    """The short name of a level id, for logs, tables and plots.

    Examples:
        >>> level_name("BabyAI-GoToLocal-v0"), level_name("MiniGrid-Empty-5x5-v0")
        ('GoToLocal', 'Empty-5x5')
    """
    text = level.removeprefix("BabyAI-").removeprefix("MiniGrid-")
    return text.rsplit("-v", 1)[0] if "-v" in text else text


def babyai_levels() -> list[str]:
    """Sorted ids of every registered ``BabyAI-*`` gymnasium environment.

    Examples:
        >>> from mop_torchrl.babyai.levels import babyai_levels
        >>> "BabyAI-GoToLocal-v0" in babyai_levels()
        True
    """
    import gymnasium as gym
    import minigrid  # noqa: F401  (registers the BabyAI-* ids)

    return sorted(k for k in gym.registry if k.startswith("BabyAI-"))


def resolve_level(level: str) -> str:
    """The registered id for ``level``; accepts the short form (``"GoToRedBall"``).

    Raises:
        ValueError: for an unknown level, listing the closest registered ids.

    Examples:
        >>> from mop_torchrl.babyai.levels import resolve_level
        >>> resolve_level("GoToRedBall")
        'BabyAI-GoToRedBall-v0'
        >>> resolve_level("BabyAI-GoToLocal-v0")
        'BabyAI-GoToLocal-v0'
    """
    levels = babyai_levels()
    registered = set(levels)
    candidates = [level]
    if not level.startswith("BabyAI-"):
        candidates.append(f"BabyAI-{level}")
    candidates += [f"{c}-v0" for c in candidates if not re.search(r"-v\d+$", c)]
    for cand in candidates:
        if cand in registered:
            return cand
    # near matches on the full ids and on the short names
    full = f"BabyAI-{level}" if not level.startswith("BabyAI-") else level
    near = difflib.get_close_matches(full, levels, n=5, cutoff=0.6)
    short = {lv[len("BabyAI-") :].rsplit("-v", 1)[0]: lv for lv in levels}
    for s in difflib.get_close_matches(level.removeprefix("BabyAI-"), list(short), n=5):
        if short[s] not in near:
            near.append(short[s])
    hint = ", ".join(near) if near else "none (see mop_torchrl.babyai.levels.babyai_levels())"
    raise ValueError(f"Unknown BabyAI level {level!r}. Near matches: {hint}.")


def resolve_levels(levels: str | Sequence[str]) -> list[str]:
    """Registered ids for one level or several (a sequence, or one comma-separated string).

    Raises:
        ValueError: for an unknown level (naming near matches), an empty list or a repeat.

    Examples:
        >>> from mop_torchrl.babyai.levels import resolve_levels
        >>> resolve_levels("GoToRedBall, GoToLocal")
        ['BabyAI-GoToRedBall-v0', 'BabyAI-GoToLocal-v0']
    """
    names = levels.split(",") if isinstance(levels, str) else list(levels)
    resolved = [resolve_level(name.strip()) for name in names if name.strip()]
    if not resolved:
        raise ValueError(f"no BabyAI level given in {levels!r}")
    repeated = sorted({lv for lv in resolved if resolved.count(lv) > 1})
    if repeated:
        raise ValueError(f"level(s) {repeated} given more than once (use level weights)")
    return resolved


def parse_level_weights(weights: str | Sequence[float] | None, num_levels: int) -> list[float]:
    """Per-level sampling probabilities: uniform for ``None``, else ``weights`` normalised.

    Raises:
        ValueError: when the count differs from ``num_levels`` or a weight is not a positive
            finite number.

    Examples:
        >>> from mop_torchrl.babyai.levels import parse_level_weights
        >>> parse_level_weights("1,3", 2), parse_level_weights(None, 4)[0]
        ([0.25, 0.75], 0.25)
    """
    if weights is None:
        return [1.0 / num_levels] * num_levels
    items = weights.split(",") if isinstance(weights, str) else list(weights)
    try:
        values = [float(w) for w in items]
    except ValueError:
        raise ValueError(f"level weights must be numbers, got {weights!r}") from None
    if len(values) != num_levels:
        raise ValueError(f"{len(values)} level weights given for {num_levels} levels")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"level weights must be positive and finite, got {weights!r}")
    total = sum(values)
    return [v / total for v in values]
