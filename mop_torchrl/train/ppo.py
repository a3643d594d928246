"""PPO for the recurrent BabyAI actor-critic (``ClipPPOLoss`` + ``GAE``).

From scratch, or from an imitation checkpoint (``init_checkpoint``). Minibatches split the
batch along envs so each keeps its whole ``unroll_len`` sequence, which the loss replays in
recurrent mode from the stored hidden states. Episode ends (success or time-out) are treated
as terminal, as BabyAI's own PPO does; GAE runs in recurrent mode with ``shifted=True`` (and
vmap: the MoP core and the encoder run under ``torch.vmap``). For MoP the routing cost of the
loss's own actor pass is added in plain form ``α·cost``
(:class:`~mop_torchrl.train.losses.RoutingClipPPOLoss`; the scaled form needs a positive task
loss, which PPO's objective is not).
"""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

import torch
from torch import nn
from torchrl.modules import set_recurrent_mode
from torchrl.objectives.value import GAE

from mop_torchrl.train.collection import segment_batches
from mop_torchrl.train.config import TrainConfig
from mop_torchrl.train.losses import RoutingClipPPOLoss, total_loss
from mop_torchrl.train.policy import build_policy
from mop_torchrl.train.run import Run, check_finite
from mop_torchrl.train.stats import EpisodeStats, MetricMeans

__all__ = ["train_ppo"]


def train_ppo(config: TrainConfig, resume: bool = False) -> Path:
    """Runs (or resumes) PPO; returns the run directory."""
    run = Run(config, resume)
    torch.manual_seed(config.seed)
    actor, critic = build_policy(config)
    loss_module = RoutingClipPPOLoss(
        actor,
        critic,
        alpha=config.alpha,
        clip_epsilon=config.clip_epsilon,
        entropy_coeff=config.entropy_coef,
        critic_coeff=config.critic_coef,
        normalize_advantage=True,
    )
    advantage = GAE(gamma=config.gamma, lmbda=config.gae_lambda, value_network=critic, shifted=True)
    optimizer = torch.optim.Adam(loss_module.parameters(), lr=config.lr)
    modules = {"actor": actor, "critic": critic}
    run.restore(modules, optimizer)
    batches = segment_batches(actor, config, run.start_update, expert=False, salt=1)
    stats = EpisodeStats(levels=config.levels, total=run.extra.get("episodes", 0))
    metrics = MetricMeans()

    with closing(batches), run.updates(modules, optimizer) as updates:
        for update in updates:
            with updates.phase("collect", update):
                _, data = next(batches)  # [num_envs, unroll_len]
            stats.add(data)
            with updates.phase("train", update):
                data["next", "terminated"] = data["next", "done"].clone()
                data.names = [None, "time"]  # GAE: the last dim is time
                with torch.no_grad(), set_recurrent_mode(True):
                    advantage(data)
                actor.train()
                for _ in range(config.ppo_epochs):
                    for envs in torch.randperm(config.num_envs).chunk(config.minibatches):
                        losses = loss_module(data[envs])  # whole rows: sequences
                        loss = total_loss(losses)
                        check_finite(loss, update)
                        optimizer.zero_grad()
                        loss.backward()
                        grad_norm = nn.utils.clip_grad_norm_(
                            loss_module.parameters(), config.max_grad_norm
                        )
                        optimizer.step()
                        metrics.add(losses, "train/")
                        metrics.add({"train/loss": loss, "train/grad_norm": grad_norm})
                actor.eval()
            updates.end(update, data.numel(), metrics, stats)
    return run.dir
