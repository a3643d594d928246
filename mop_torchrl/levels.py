"""BabyAI level names and the agreed difficulty order (pure data, no env imports).

The order is the one of the published imitation baselines (demos BabyAI 1.0 needed to reach 99%
success); the distractor-free and grey variants of GoToRedBall are easier than it and tie with
each other. The pathway analysis (:mod:`mop_torchrl.analysis.pathways`) correlates routing cost
with this rank.

Examples:
    >>> from mop_torchrl.levels import LEVEL_DIFFICULTY, level_name
    >>> level_name("BabyAI-PickupLoc-v0"), LEVEL_DIFFICULTY["PickupLoc"]
    ('PickupLoc', 4)
"""

from __future__ import annotations

__all__ = ["LEVEL_DIFFICULTY", "level_name"]

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
