"""What a BabyAI mission asks for and what a step did: mission types and step events.

Pure BabyAI knowledge (the mission grammar of ``minigrid.envs.babyai.core.verifier`` and the
effects of minigrid's actions), used to label the routing-analysis tables
(:mod:`mop_torchrl.analysis.schema`). Imports neither gymnasium nor minigrid.

Examples:
    >>> from mop_torchrl.babyai.semantics import mission_type, step_event
    >>> mission_type("pick up the red ball, then open a door")
    'pick_up'
    >>> step_event(3, carrying_before=False, carrying_after=True)
    'pickup'
"""

from __future__ import annotations

import re

from mop_torchrl.babyai.levels import ACTION_NAMES

__all__ = ["EVENTS", "MISSION_TYPES", "mission_type", "step_event"]

#: Values of :func:`mission_type`.
MISSION_TYPES: tuple[str, ...] = ("go_to", "pick_up", "open", "put_next", "other")
#: Atomic values of :func:`step_event` (several are joined by ``"+"``).
EVENTS: tuple[str, ...] = ("pickup", "drop", "toggle_door", "toggle", "goal_reached")

# Compound missions (minigrid.envs.babyai.core.verifier): "A, then B", "A after you B", "A and B".
_SPLIT_RE = re.compile(r",?\s+(?:then|after you|and)\s+")
_CLAUSE_TYPES = (
    ("go to ", "go_to"),
    ("pick up ", "pick_up"),
    ("open ", "open"),
    ("put ", "put_next"),
)
_PICKUP, _DROP, _TOGGLE = (ACTION_NAMES.index(name) for name in ("pickup", "drop", "toggle"))


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
    """The event string of one step, from the action and the state change it caused.

    Args:
        action: the action taken (minigrid ``Actions`` index,
            :data:`~mop_torchrl.babyai.levels.ACTION_NAMES`).
        carrying_before: whether the agent carried an object before the step.
        carrying_after: whether it carries one after the step.

    Keyword Args:
        door_changed: the cell in front of the agent is a door whose open/locked state changed.
        toggled_other: a toggle changed another object (e.g. opened a box).
        success: the step ended the episode with success.

    Returns:
        ``""`` when nothing happened, else the :data:`EVENTS` joined by ``"+"``.

    Examples:
        >>> step_event(3, False, True)
        'pickup'
        >>> step_event(3, False, False)  # a failed pickup is no event
        ''
        >>> step_event(5, False, False, door_changed=True, success=True)
        'toggle_door+goal_reached'
    """
    events = []
    if action == _PICKUP and not carrying_before and carrying_after:
        events.append("pickup")
    elif action == _DROP and carrying_before and not carrying_after:
        events.append("drop")
    elif action == _TOGGLE and door_changed:
        events.append("toggle_door")
    elif action == _TOGGLE and toggled_other:
        events.append("toggle")
    if success:
        events.append("goal_reached")
    return "+".join(events)
