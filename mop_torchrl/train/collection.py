"""Where training data comes from: env factories and the TorchRL collector for a config.

Collection is split into segments that end at checkpoint boundaries; each segment builds fresh
envs seeded from ``(seed, segment)``, so a resumed run sees exactly the data an uninterrupted
run would have seen.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

from tensordict import TensorDictBase
from tensordict.nn import InteractionType
from torch import nn
from torchrl.collectors import Collector
from torchrl.envs import EnvBase

from mop_torchrl.envs import make_babyai_env
from mop_torchrl.train.config import TrainConfig

__all__ = ["env_factory", "make_collector", "segment_batches"]


def env_factory(config: TrainConfig, expert: bool, seed: int) -> Callable[[], EnvBase]:
    """A picklable function building the config's batched BabyAI env.

    With ``expert=True`` the bot labels every step and measures its own solution length from
    each start (for the path ratio).
    """
    return functools.partial(
        make_babyai_env,
        config.task_id,
        num_envs=config.num_envs,
        seed=seed,
        expert=expert,
        parallel=config.env_batching == "parallel",
        path_ratio=expert,
    )


def make_collector(
    config: TrainConfig,
    actor: nn.Module,
    create_env: Callable[[], EnvBase],
    total_frames: int,
    exploration: InteractionType,
) -> Collector:
    """A collector yielding ``num_envs × unroll_len`` frames per batch."""
    return Collector(
        create_env(),
        actor,
        frames_per_batch=config.num_envs * config.unroll_len,
        total_frames=total_frames,
        exploration_type=exploration,
        auto_register_policy_transforms=True,
    )


def segment_batches(
    actor: nn.Module, config: TrainConfig, start: int, expert: bool, salt: int = 0
) -> Iterator[tuple[int, TensorDictBase]]:
    """Yields ``(update, batch [num_envs, unroll_len])`` for the updates from ``start`` on."""
    frames = config.num_envs * config.unroll_len
    greedy = config.algo == "imitation" and config.student_action == "greedy"
    exploration = InteractionType.DETERMINISTIC if greedy else InteractionType.RANDOM
    update = start
    while update < config.num_updates:
        segment = update // config.checkpoint_interval
        end = min((segment + 1) * config.checkpoint_interval, config.num_updates)
        create_env = env_factory(config, expert, seed=config.seed + 7919 * (segment + 1) + salt)
        collector = make_collector(config, actor, create_env, frames * (end - update), exploration)
        try:
            for data in collector:
                yield update, data.reshape(config.num_envs, config.unroll_len)
                update += 1
        finally:
            collector.shutdown()
