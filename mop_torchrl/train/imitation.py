"""Online imitation of the BabyAI bot: DAgger with an aggregated dataset.

Each update: a TorchRL ``Collector`` steps ``num_envs`` envs for ``unroll_len`` steps with the
student acting (greedy by default; with probability β the bot acts instead, DAgger's mixing);
the bot in each env worker labels every step with ``expert_action``. The batch joins the DAgger
dataset (:class:`~mop_torchrl.train.dagger.DaggerDataset`, a TorchRL replay buffer of the last
``buffer_frames`` frames, saved with every checkpoint), and ``updates_per_batch`` optimizer
updates follow, each on slices sampled from it: cross-entropy to the labels (``-1``, a bot
failure or a burn-in step, is ignored) recomputed in recurrent mode from the hidden states
stored at collection time (truncated BPTT), plus the routing cost for MoP.

Why replay: with one update per fresh batch, consecutive batches continue the same episodes
and the policy never learns to read the mission (GoToLocal held-out label accuracy 0.651 with
true vs 0.656 with shuffled missions); aggregating the rollouts, as DAgger prescribes, fixes it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tensordict import TensorDictBase
from tensordict.nn import TensorDictSequential
from torch import nn
from torchrl.modules import set_recurrent_mode

from mop_torchrl.core.model import routing_cost_loss
from mop_torchrl.train.collection import segment_batches
from mop_torchrl.train.config import TrainConfig
from mop_torchrl.train.dagger import BotMixer, DaggerDataset, dagger_beta
from mop_torchrl.train.policy import build_policy
from mop_torchrl.train.run import EpisodeStats, Run, check_finite

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
    """Runs (or resumes) online imitation (DAgger); returns the run directory."""
    run, actor, optimizer, modules = start_imitation(config, resume)
    dataset = DaggerDataset(
        actor.in_keys, config.buffer_frames, config.slice_len, config.burn_in, config.batch_slices
    )
    run.track("dagger", dataset)
    mixer = BotMixer(dagger_beta(config.dagger_beta, config.dagger_beta_updates, run.start_update))
    policy = TensorDictSequential(actor, mixer) if config.dagger_beta > 0 else actor
    update_on = imitation_step(actor, optimizer, config)

    def train_step(data: TensorDictBase, update: int) -> dict[str, float]:
        dataset.extend(data)
        steps = [update_on(dataset.sample(), update) for _ in range(config.updates_per_batch)]
        mixer.beta = dagger_beta(config.dagger_beta, config.dagger_beta_updates, update + 1)
        metrics = {key: sum(m[key] for m in steps) / len(steps) for key in steps[0]}
        metrics["train/dagger_beta"] = mixer.beta
        metrics["train/dataset_frames"] = len(dataset)
        return metrics

    batches = segment_batches(policy, config, run.start_update, expert=True)
    run.fit(batches, train_step, modules, optimizer, EpisodeStats(levels=config.levels))
    return run.dir
