"""Online imitation of the BabyAI bot (DAgger-style), the BabyAI integration's loop.

Each update: a TorchRL ``Collector`` steps ``num_envs`` envs for ``unroll_len`` steps with the
student acting (greedy by default); the bot in each env worker labels every step with
``expert_action``. The loss is the cross-entropy to those labels (``-1``, a bot failure, is
ignored) recomputed in recurrent mode from the stored hidden states (truncated BPTT), plus the
routing cost for MoP.

Data comes from :func:`~mop_torchrl.train.collection.segment_batches`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tensordict import TensorDictBase
from torch import nn
from torchrl.modules import set_recurrent_mode

from mop_torchrl.model import routing_cost_loss
from mop_torchrl.train.collection import segment_batches
from mop_torchrl.train.config import TrainConfig
from mop_torchrl.train.run import EpisodeStats, Run, build_policy, check_finite

__all__ = ["imitation_loss", "imitation_step", "start_imitation", "train_imitation"]


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


def start_imitation(
    config: TrainConfig, resume: bool
) -> tuple[Run, nn.Module, torch.optim.Optimizer, dict[str, nn.Module]]:
    """The run, actor, optimizer and checkpointed modules of an imitation run (online or BC)."""
    run = Run(config, resume)
    torch.manual_seed(config.seed)
    actor, critic = build_policy(config)
    optimizer = torch.optim.Adam(actor.parameters(), lr=config.lr)
    modules = {"actor": actor, "critic": critic}
    run.restore(modules, optimizer)
    return run, actor, optimizer, modules


def train_imitation(config: TrainConfig, resume: bool = False) -> Path:
    """Runs (or resumes) online imitation; returns the run directory."""
    run, actor, optimizer, modules = start_imitation(config, resume)
    batches = segment_batches(actor, config, run.start_update, expert=True)
    run.fit(batches, imitation_step(actor, optimizer, config), modules, optimizer, EpisodeStats())
    return run.dir
