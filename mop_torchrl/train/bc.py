"""Behaviour cloning from stored bot demonstrations.

Sequences are sampled from the demo buffer with ``SliceSampler`` (each slice starts with
``is_init``, so the core starts it from a zero state) and the policy is trained in recurrent
mode with the same loss as online imitation (:class:`~mop_torchrl.train.losses.ImitationLoss`).
A demo directory holds one level, so the routing cost is in its batch form (``cost_scaling``
resolves to ``batch``; the demos store no level index).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mop_torchrl.babyai.demos import open_demos, sample_sequences
from mop_torchrl.train.config import TrainConfig
from mop_torchrl.train.losses import imitation_loss, learner_autocast, total_loss
from mop_torchrl.train.policy import build_policy
from mop_torchrl.train.run import Run, check_finite
from mop_torchrl.train.stats import MetricMeans

__all__ = ["train_bc"]


def train_bc(config: TrainConfig, resume: bool = False) -> Path:
    """Runs (or resumes) behaviour cloning from ``config.demos``; returns the run directory."""
    run = Run(config, resume)
    torch.manual_seed(config.seed)
    actor, critic = build_policy(config)
    loss_module = imitation_loss(actor, config)
    optimizer = torch.optim.Adam(actor.parameters(), lr=config.lr)
    modules = {"actor": actor, "critic": critic}
    run.restore(modules, optimizer)
    demos, _ = open_demos(config.demos)  # checked (level included) by Run
    metrics = MetricMeans()

    with run.updates(modules, optimizer) as updates:
        for update in updates:
            with updates.phase("collect", update):
                batch = sample_sequences(demos, config.batch_slices, config.slice_len)
            with updates.phase("train", update):
                actor.train()
                with learner_autocast(config):
                    losses = loss_module(batch)
                loss = total_loss(losses)
                check_finite(loss, update)
                optimizer.zero_grad()
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(actor.parameters(), config.max_grad_norm)
                optimizer.step()
                actor.eval()
                metrics.add(losses, "train/")
                metrics.add({"train/loss": loss, "train/grad_norm": grad_norm})
            updates.end(update, batch.numel(), metrics)
    return run.dir
