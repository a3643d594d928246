"""Record a MoP policy's routing on real BabyAI episodes, and sweep the ablation knobs.

:func:`record_routes` fills the routes and episodes tables of :mod:`mop_torchrl.analysis.schema`
by running greedy episodes in ONE gymnasium env built with
:func:`~mop_torchrl.babyai.wrappers.make_babyai_gym_env` (``expert=True``), in a hand-written
loop: the agent's position, direction, carrying state, doors and objects are read from the
unwrapped minigrid env (which a batched TorchRL env would hide in a worker), and the actor is
called one step at a time on an unbatched :class:`~tensordict.TensorDict` whose hidden states
the loop carries as a TorchRL collector would (the next observation is written under ``"next"``
beside the states the actor wrote there, and :func:`~torchrl.envs.utils.step_mdp` moves them to
the root; zeros and ``is_init=True`` at each reset).

The env is seeded like env 0 of :func:`~mop_torchrl.train.evaluate.evaluate` with
``num_envs=1`` (``worker_seeds(seed + EVAL_SEED_OFFSET, 1)[0]``), so a recording replays the
held-out evaluation episodes of the same ``seed``.

:func:`sweep_ablation` runs :func:`~mop_torchrl.train.evaluate.evaluate` under every setting of
the inference knobs (:meth:`~mop_torchrl.core.module.MoPModule.set_inference_knobs`) and reports the
success-rate drop of each against the unablated baseline.

Examples:
    >>> import tempfile
    >>> from mop_torchrl.core.config import MoPConfig
    >>> from mop_torchrl.babyai.policy import make_policy
    >>> from mop_torchrl.analysis.record import record_routes
    >>> actor, _ = make_policy("mop", mop=MoPConfig(layers="0,8;8,16", intermediate_dim=16,
    ...                                            router_dim=8))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     routes, episodes = record_routes(actor, "GoToRedBall", episodes=1, out_dir=tmp,
    ...                                      max_steps=8)
    >>> bool(len(routes) == routes["episode_length"].iloc[0]), len(episodes)
    (True, 1)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tensordict import TensorDict
from tensordict.nn import InteractionType, set_interaction_type
from torch import nn
from torchrl.envs.utils import step_mdp

from mop_torchrl.analysis.schema import validate_episodes, validate_routes
from mop_torchrl.analysis.tables import write_tables
from mop_torchrl.babyai.envs import worker_seeds
from mop_torchrl.babyai.levels import resolve_levels
from mop_torchrl.babyai.semantics import mission_type, step_event
from mop_torchrl.babyai.wrappers import make_babyai_gym_env
from mop_torchrl.core.module import MoPModule

__all__ = ["FRAMES_DIR", "mop_cores", "record_routes", "sweep_ablation"]

#: Sub-folder of ``out_dir`` holding the first frames (``frame_path`` is relative to ``out_dir``).
FRAMES_DIR = "frames"
_OBS_KEYS = ("image", "direction", "carrying", "mission")


def mop_cores(actor: nn.Module) -> list[MoPModule]:
    """The :class:`~mop_torchrl.core.module.MoPModule` cores of ``actor``.

    Raises:
        ValueError: when there is none (e.g. a GRU policy), since it has no routing to analyse.
    """
    cores = [m for m in actor.modules() if isinstance(m, MoPModule)]
    if not cores:
        raise ValueError(
            f"routing analysis needs a MoP policy; this actor ({type(actor).__name__}) has no "
            "MoPModule core (a GRU policy has no routing)"
        )
    return cores


@contextlib.contextmanager
def _knobs(cores: Sequence[MoPModule], weight_threshold: float, disable_largest: bool) -> Iterator:
    """Sets the inference knobs for the ``with`` body, then restores the previous ones."""
    saved = [[(b.weight_threshold, b.disable_largest) for b in core.core.blocks] for core in cores]
    try:
        for core in cores:
            core.set_inference_knobs(
                weight_threshold=weight_threshold, disable_largest=disable_largest
            )
        yield
    finally:
        for core, blocks in zip(cores, saved):
            for block, (threshold, largest) in zip(core.core.blocks, blocks):
                block.weight_threshold, block.disable_largest = threshold, largest


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _objects(grid: Any) -> list[dict[str, Any]]:
    """Every non-wall object of a minigrid grid (doors included), row by row."""
    out = []
    for y in range(grid.height):
        for x in range(grid.width):
            obj = grid.get(x, y)
            if obj is not None and obj.type != "wall":
                out.append({"type": obj.type, "color": obj.color, "x": x, "y": y})
    return out


def _start_room(base: Any) -> tuple[int, int]:
    """``(column, row)`` of the room the agent is in; ``(-1, -1)`` for envs without rooms."""
    room_size = getattr(base, "room_size", None)
    if room_size is None or not hasattr(base, "room_from_pos"):
        return -1, -1
    x, y = (int(v) for v in base.agent_pos)
    return x // (room_size - 1), y // (room_size - 1)


def _front(base: Any) -> tuple[Any, tuple[bool, bool] | None]:
    """The object in front of the agent and, for a door, its ``(is_open, is_locked)``."""
    fx, fy = (int(v) for v in base.front_pos)
    if not (0 <= fx < base.grid.width and 0 <= fy < base.grid.height):
        return None, None
    obj = base.grid.get(fx, fy)
    door = (
        (bool(obj.is_open), bool(obj.is_locked)) if obj is not None and obj.type == "door" else None
    )
    return obj, door


def _observation_td(obs: dict[str, Any], is_init: bool) -> TensorDict:
    # "expert_action" rides along (the policy ignores it; a wrapper may act on it).
    keys = [*_OBS_KEYS, "expert_action"] if "expert_action" in obs else _OBS_KEYS
    td = TensorDict({key: torch.as_tensor(np.asarray(obs[key])) for key in keys}, [])
    td.set("is_init", torch.tensor([is_init]))
    return td


@torch.no_grad()
def record_routes(
    actor: nn.Module,
    level: str | Sequence[str],
    episodes: int,
    seed: int = 0,
    out_dir: str | Path | None = None,
    weight_threshold: float = 0.0,
    disable_largest: bool = False,
    *,
    max_steps: int | None = None,
    tile_size: int = 32,
    labels: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Runs greedy episodes of a MoP actor on a BabyAI level and records its routing.

    The actor is run in eval mode with deterministic (greedy) actions; its mode and inference
    knobs are restored afterwards. Expert actions are the BabyAI bot's labels of the very
    observations acted on (``-1`` where the bot failed).

    Args:
        actor (nn.Module): a policy from ``make_policy("mop", ...)`` (or
            :func:`~mop_torchrl.train.evaluate.load_actor`).
        level (str or list of str): a BabyAI level id or short name (``"GoToRedBall"``), or
            several (a list, or ``"GoToRedBall,GoToLocal"``): each is recorded in turn.
        episodes (int): number of episodes to record (per level).
        seed (int, optional): evaluation seed (as in :func:`~mop_torchrl.train.evaluate.
            evaluate`). Defaults to ``0``.
        out_dir (str or Path, optional): when given, writes ``routes`` and ``episodes`` as
            Parquet and CSV (:func:`~mop_torchrl.analysis.tables.write_tables`) and each
            episode's first frame ``frames/ep{e}.png`` there (``frame_path`` is relative to
            ``out_dir``: pass ``frames_root=out_dir`` to :func:`~mop_torchrl.analysis.plot_all`).
            Without it no frame is rendered and ``frame_path`` is ``""``.
        weight_threshold (float, optional): inference knob τ. Defaults to ``0.0``.
        disable_largest (bool, optional): inference knob. Defaults to ``False``.

    Keyword Args:
        max_steps (int, optional): fixed step limit per episode (passed to the level);
            default: the level's own.
        tile_size (int, optional): pixels per grid cell of the rendered frames. Defaults to 32.
        labels (bool, optional): label each step with the bot's action. The bot replans after
            every student step, which dominates the time of long failed episodes (about 25 s
            per 512-step PutNextLocal episode); without it ``expert_action`` is ``-1``.
            Defaults to ``True``.

    Returns:
        ``(routes, episodes)`` DataFrames, validated against the schema. Routes also have a
        ``reward`` column (the step's reward).

    Raises:
        ValueError: for an actor without a MoP core (a GRU policy), or ``episodes < 1``.

    Examples:
        >>> from mop_torchrl.core.config import MoPConfig
        >>> from mop_torchrl.babyai.policy import make_policy
        >>> actor, _ = make_policy("mop", mop=MoPConfig(layers="0,8", intermediate_dim=8,
        ...                                            router_dim=8))
        >>> routes, episodes = record_routes(actor, "GoToRedBall", episodes=1, max_steps=5)
        >>> list(routes.filter(like="w0_").columns), episodes["frame_path"].tolist()
        (['w0_0', 'w0_1'], [''])
    """
    cores = mop_cores(actor)
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    core = cores[0]  # the actor's recurrent core (make_policy builds exactly one)
    layers = [list(block) for block in core.config.layers]
    levels = resolve_levels(level)
    from mop_torchrl.train.evaluate import EVAL_SEED_OFFSET

    make_kwargs = {} if max_steps is None else {"max_steps": max_steps}
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        (out / FRAMES_DIR).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    episode_rows: list[dict[str, Any]] = []
    with (
        _eval_mode(actor),
        _knobs(cores, weight_threshold, disable_largest),
        set_interaction_type(InteractionType.DETERMINISTIC),
    ):
        for level in levels:
            env = make_babyai_gym_env(
                level,
                seed=worker_seeds(seed + EVAL_SEED_OFFSET, 1)[0],
                expert=labels,
                **make_kwargs,
            )
            try:
                _record_level(actor, core, env, episodes, rows, episode_rows, out, tile_size)
            finally:
                env.close()
    routes = pd.DataFrame(rows)
    episodes_df = pd.DataFrame(episode_rows)
    validate_routes(routes, layers)
    validate_episodes(episodes_df)
    if out is not None:
        write_tables(out, routes=routes, episodes=episodes_df)
    return routes, episodes_df


def _record_level(
    actor: nn.Module,
    core: MoPModule,
    env: Any,
    episodes: int,
    rows: list[dict[str, Any]],
    episode_rows: list[dict[str, Any]],
    out: Path | None,
    tile_size: int,
) -> None:
    """Appends ``episodes`` recorded episodes of ``env`` (one level) to the tables; episode ids
    continue after the ones already there."""
    layers = [list(block) for block in core.config.layers]
    base = env.unwrapped
    level = env.spec.id
    for episode in range(len(episode_rows), len(episode_rows) + episodes):
        obs, _ = env.reset()
        mission = str(base.mission)
        kind = mission_type(mission)
        frame_path = ""
        if out is not None:
            frame = base.get_frame(highlight=False, tile_size=tile_size)
            frame_path = f"{FRAMES_DIR}/ep{episode}.png"
            _save_png(frame, out / frame_path)
        start_x, start_y = _start_room(base)
        episode_rows.append(
            {
                "episode": episode,
                "level": level,
                "mission": mission,
                "grid_width": int(base.width),
                "grid_height": int(base.height),
                "start_room_x": start_x,
                "start_room_y": start_y,
                "objects": json.dumps(_objects(base.grid)),
                "frame_path": frame_path,
            }
        )
        td = _observation_td(obs, True).update(core.initial_state(()))
        first, total, done, success = len(rows), 0.0, False, False
        step = 0
        while not done:
            td = actor(td)
            action = int(td["action"])
            routing = core.routing_info(td)
            x, y = (int(v) for v in base.agent_pos)
            carrying_before = base.carrying is not None
            front_before, door_before = _front(base)
            row = {
                "level": level,
                "mission": mission,
                "mission_type": kind,
                "episode": episode,
                "step": step,
                "agent_x": x,
                "agent_y": y,
                "direction": int(base.agent_dir),
                "carrying": int(carrying_before),
                "action": action,
                "expert_action": int(obs.get("expert_action", -1)),
            }
            for b in range(len(layers)):
                weights = routing[f"block{b}"].reshape(-1).tolist()
                row.update({f"w{b}_{i}": float(w) for i, w in enumerate(weights)})
            row["cost"] = float(routing["cost"].sum())
            obs, reward, terminated, truncated, info = env.step(action)
            done = bool(terminated or truncated)
            success = bool(info["success"])
            front_after, door_after = _front(base)
            row["event"] = step_event(
                action,
                carrying_before,
                base.carrying is not None,
                door_changed=door_before is not None and door_after != door_before,
                toggled_other=door_before is None and front_after is not front_before,
                success=success,
            )
            row["reward"] = float(reward)
            rows.append(row)
            total += float(reward)
            step += 1
            if not done:
                # As a TorchRL env step: the new observation goes under "next", where the actor
                # wrote its states, and step_mdp makes "next" the next step's input.
                td.get("next").update(_observation_td(obs, False))
                td = step_mdp(td, keep_other=False)
        for row in rows[first:]:
            row.update(success=int(success), episode_return=total, episode_length=step)


def _save_png(frame: np.ndarray, path: Path) -> None:
    import matplotlib.image as mpimg

    path.parent.mkdir(parents=True, exist_ok=True)
    mpimg.imsave(str(path), np.ascontiguousarray(frame, dtype=np.uint8))


def _setting_name(threshold: float, disable_largest: bool) -> str:
    parts = [f"threshold={threshold:g}"] if threshold > 0 else []
    if disable_largest:
        parts.append("no_largest")
    return "+".join(parts) or "baseline"


def sweep_ablation(
    checkpoint_or_actor: str | Path | nn.Module,
    level: str | None = None,
    episodes: int = 100,
    thresholds: Sequence[float] = (0.0, 0.1, 0.2, 0.3),
    disable_largest: Sequence[bool] = (False, True),
    seed: int = 0,
    *,
    num_envs: int = 4,
) -> pd.DataFrame:
    """Greedy evaluation under every ablation setting, against the unablated baseline.

    Settings are ``thresholds × disable_largest``, plus the baseline (``threshold=0``,
    ``disable_largest=False``) first if the grid lacks it; each is evaluated with
    :func:`~mop_torchrl.train.evaluate.evaluate` on the same episodes (same ``seed``). The
    actor's knobs are restored afterwards.

    Args:
        checkpoint_or_actor: a checkpoint path (its run dir works too) or a MoP actor.
        level (str, optional): the level; default: the checkpoint's training level (required
            with an actor).
        episodes (int, optional): episodes per setting. Defaults to ``100``.
        thresholds (sequence of float, optional): weight thresholds τ in ``[0, 1)``.
        disable_largest (sequence of bool, optional): values of the disable-largest knob.
        seed (int, optional): evaluation seed. Defaults to ``0``.

    Keyword Args:
        num_envs (int, optional): envs per evaluation (serial). Defaults to ``4``.

    Returns:
        One row per setting: ``setting, threshold, disable_largest, success_rate, drop,
        relative_drop, mean_cost, mean_return, mean_length, episodes`` where ``drop =
        baseline success_rate - success_rate`` (what :func:`~mop_torchrl.analysis.
        plot_ablation` plots), ``relative_drop = drop / baseline success_rate`` (``0`` when the
        baseline never succeeds) and ``mean_cost`` the mean routing cost per step.

    Raises:
        ValueError: for a GRU policy, an actor without ``level``, or a threshold outside
            ``[0, 1)``.

    Examples:
        >>> from mop_torchrl.core.config import MoPConfig
        >>> from mop_torchrl.babyai.policy import make_policy
        >>> actor, _ = make_policy("mop", mop=MoPConfig(layers="0,8", intermediate_dim=8,
        ...                                            router_dim=8))
        >>> table = sweep_ablation(actor, "GoToRedBall", episodes=1, thresholds=(0.0,),
        ...                        num_envs=1)
        >>> table["setting"].tolist(), float(table["drop"].iloc[0])
        (['baseline', 'no_largest'], 0.0)
    """
    from mop_torchrl.train.evaluate import evaluate
    from mop_torchrl.train.policy import load_actor

    if isinstance(checkpoint_or_actor, nn.Module):
        actor = checkpoint_or_actor
        if level is None:
            raise ValueError("sweep_ablation: give the level when passing an actor")
    else:
        actor, config = load_actor(checkpoint_or_actor)
        level = level or config.task_id
    cores = mop_cores(actor)
    for threshold in thresholds:
        if not 0.0 <= float(threshold) < 1.0:
            raise ValueError(f"thresholds must be in [0, 1), got {threshold!r}")
    settings = [(float(t), bool(d)) for t in thresholds for d in disable_largest]
    settings = list(dict.fromkeys([(0.0, False), *settings]))
    rows = []
    with _eval_mode(actor):
        for threshold, largest in settings:
            with _knobs(cores, threshold, largest):
                result = evaluate(actor, level, episodes=episodes, seed=seed, num_envs=num_envs)
            rows.append(
                {
                    "setting": _setting_name(threshold, largest),
                    "threshold": threshold,
                    "disable_largest": largest,
                    "success_rate": float(result["success_rate"]),
                    "mean_cost": float(result["routing_cost"] or 0.0),
                    "mean_return": float(result["mean_return"]),
                    "mean_length": float(result["mean_length"]),
                    "episodes": int(result["episodes"]),
                }
            )
    table = pd.DataFrame(rows)
    baseline = float(table["success_rate"].iloc[0])
    table.insert(4, "drop", baseline - table["success_rate"])
    table.insert(5, "relative_drop", table["drop"] / baseline if baseline > 0 else 0.0)
    return table
