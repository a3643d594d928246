"""Online imitation of the BabyAI bot (DAgger-style), the BabyAI integration's loop.

Each update: a TorchRL ``Collector`` steps ``num_envs`` envs for ``unroll_len`` steps with the
student acting (greedy by default); the bot in each env worker labels every step with
``expert_action``. The loss is the cross-entropy to those labels (``-1``, a bot failure, is
ignored) recomputed in recurrent mode from the stored hidden states (truncated BPTT), plus the
routing cost for MoP.

The envs are re-seeded and the collector re-created at every checkpoint boundary, so a resumed
run sees exactly the data an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from tensordict import TensorDictBase
from tensordict.nn import InteractionType
from torch import nn
from torchrl.collectors import Collector
from torchrl.envs import EnvBase
from torchrl.modules import set_recurrent_mode

from mop_torchrl.envs import make_babyai_env
from mop_torchrl.model import routing_cost_loss
from mop_torchrl.train.config import TrainConfig
from mop_torchrl.train.run import EpisodeStats, Run, build_policy, check_finite

__all__ = ["imitation_loss", "imitation_step", "segment_batches", "train_imitation"]


def imitation_loss(
    actor: nn.Module, data: TensorDictBase, config: TrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy to ``expert_action`` over ``[B, T]`` sequences, plus the routing cost.

    ``data`` must hold the observations, ``is_init`` and the hidden states stored at collection
    time; the policy is re-run in recurrent mode so gradients flow through time.
    """
    with set_recurrent_mode(True):
        out = _forward(actor, data)
    logits, labels = out["logits"], data["expert_action"].reshape(out["logits"].shape[:-1])
    valid = labels >= 0
    task = F.cross_entropy(logits[valid], labels[valid])
    metrics = {
        "train/cross_entropy": task.item(),
        "train/accuracy": (logits.argmax(-1) == labels)[valid].float().mean().item(),
        "train/label_fraction": valid.float().mean().item(),
    }
    loss = task
    if ("routing", "cost") in out.keys(True):
        cost = out["routing", "cost"]
        loss = routing_cost_loss(task, cost, config.alpha, config.epsilon, config.cost_mode)
        metrics.update(routing_metrics(out))
    metrics["train/loss"] = loss.item()
    return loss, metrics


def imitation_step(
    actor: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig
) -> Callable[[TensorDictBase, int], dict[str, float]]:
    """One optimizer update on :func:`imitation_loss` (shared by online imitation and BC)."""

    def train_step(data: TensorDictBase, update: int) -> dict[str, float]:
        loss, metrics = imitation_loss(actor.train(), data, config)
        check_finite(loss, update)
        optimizer.zero_grad()
        loss.backward()
        metrics["train/grad_norm"] = nn.utils.clip_grad_norm_(
            actor.parameters(), config.max_grad_norm
        ).item()
        optimizer.step()
        actor.eval()
        return metrics

    return train_step


def _forward(actor: nn.Module, data: TensorDictBase) -> TensorDictBase:
    """Runs the actor's deterministic part (encoder → core → logits) on a copy of ``data``."""
    return actor.module[0](data.copy())


def routing_metrics(td: TensorDictBase) -> dict[str, float]:
    """Mean routing cost and per-block mean weight of each expert."""
    metrics = {"train/routing_cost": td["routing", "cost"].mean().item()}
    for block, weights in td["routing"].items():
        if block == "cost":
            continue
        for i, value in enumerate(weights.reshape(-1, weights.shape[-1]).mean(0).tolist()):
            metrics[f"routing/{block}_expert{i}"] = value
    return metrics


def segment_batches(
    env: EnvBase, actor: nn.Module, config: TrainConfig, start: int, salt: int = 0
) -> Iterator[tuple[int, TensorDictBase]]:
    """Yields ``(update, batch)`` from ``start``; envs re-seeded at each checkpoint boundary."""
    frames = config.num_envs * config.unroll_len
    interaction = (
        InteractionType.DETERMINISTIC
        if config.algo == "imitation" and config.student_action == "greedy"
        else InteractionType.RANDOM
    )
    update = start
    while update < config.num_updates:
        segment = update // config.checkpoint_interval
        end = min((segment + 1) * config.checkpoint_interval, config.num_updates)
        env.set_seed(config.seed + 7919 * (segment + 1) + salt)
        collector = Collector(
            env,
            actor,
            frames_per_batch=frames,
            total_frames=frames * (end - update),
            exploration_type=interaction,
            auto_register_policy_transforms=True,
        )
        try:
            for data in collector:
                yield update, data.reshape(config.num_envs, config.unroll_len)
                update += 1
        finally:
            collector.shutdown(close_env=False)


def make_env(config: TrainConfig, expert: bool) -> EnvBase:
    return make_babyai_env(
        config.task_id,
        num_envs=config.num_envs,
        seed=config.seed,
        expert=expert,
        parallel=config.env_batching == "parallel",
        path_ratio=expert,
    )


def train_imitation(config: TrainConfig, resume: bool = False) -> Path:
    """Runs (or resumes) online imitation; returns the run directory."""
    run = Run(config, resume)
    torch.manual_seed(config.seed)
    actor, critic = build_policy(config)
    optimizer = torch.optim.Adam(actor.parameters(), lr=config.lr)
    modules = {"actor": actor, "critic": critic}
    run.restore(modules, optimizer)
    env = make_env(config, expert=True)
    try:
        batches = segment_batches(env, actor, config, run.start_update)
        train_step = imitation_step(actor, optimizer, config)
        run.fit(batches, train_step, modules, optimizer, EpisodeStats())
    finally:
        env.close(raise_if_closed=False)
    return run.dir
