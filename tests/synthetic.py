"""A fake but schema-valid pair of routing-analysis tables, for the analysis tests.

Not part of the package: recorded tables come from ``record_routes``; this generator only
gives the summaries and plots something with structure to work on without an env or a policy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd

from mop_torchrl.babyai.semantics import mission_type, step_event

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
    """A fake but schema-valid ``(routes, episodes)`` pair.

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
