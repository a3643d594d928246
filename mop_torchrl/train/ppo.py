"""PPO for the recurrent BabyAI actor-critic (``ClipPPOLoss`` + ``GAE``).

From scratch, or from an imitation checkpoint (``init_checkpoint``). Minibatches split the
batch along envs so each keeps its whole ``unroll_len`` sequence, which the loss replays in
recurrent mode from the stored hidden states. Episode ends (success or time-out) are treated
as terminal, as BabyAI's own PPO does; GAE runs in recurrent mode with ``shifted=True`` (and
vmap: the MoP core and the encoder run under ``torch.vmap``). For MoP the routing cost is
added in plain form ``α·cost`` (the scaled form needs a positive task loss, which PPO's
objective is not).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tensordict import TensorDictBase
from torch import nn
from torchrl.modules import set_recurrent_mode
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

from mop_torchrl.train.checkpoint import load_checkpoint
from mop_torchrl.train.collection import segment_batches
from mop_torchrl.train.config import TrainConfig
from mop_torchrl.train.imitation import routing_metrics
from mop_torchrl.train.policy import build_policy, load_modules
from mop_torchrl.train.run import EpisodeStats, Run, check_finite

__all__ = ["train_ppo"]


def train_ppo(config: TrainConfig, resume: bool = False) -> Path:
    """Runs (or resumes) PPO; returns the run directory."""
    run = Run(config, resume)
    torch.manual_seed(config.seed)
    actor, critic = build_policy(config)
    if config.init_checkpoint and run.start_update == 0:
        payload = load_checkpoint(config.init_checkpoint)
        load_modules(payload, {"actor": actor}, Path(config.init_checkpoint))
    loss_module = ClipPPOLoss(
        actor,
        critic,
        clip_epsilon=config.clip_epsilon,
        entropy_coeff=config.entropy_coef,
        critic_coeff=config.critic_coef,
        normalize_advantage=True,
    )
    advantage = GAE(
        gamma=config.gamma,
        lmbda=config.gae_lambda,
        value_network=critic,
        shifted=True,
    )
    optimizer = torch.optim.Adam(loss_module.parameters(), lr=config.lr)
    modules = {"actor": actor, "critic": critic}
    run.restore(modules, optimizer)
    use_cost = config.policy == "mop" and config.alpha > 0

    def train_step(data: TensorDictBase, update: int) -> dict[str, float]:
        data["next", "terminated"] = data["next", "done"].clone()
        data.names = [None, "time"]  # GAE: the last dim is time
        with torch.no_grad(), set_recurrent_mode(True):
            advantage(data)
        actor.train()
        metrics: dict[str, float] = {}
        for _ in range(config.ppo_epochs):
            for index in torch.randperm(config.num_envs).chunk(config.minibatches):
                batch = data[index]
                losses = loss_module(batch)
                loss = losses["loss_objective"] + losses["loss_critic"] + losses["loss_entropy"]
                if use_cost:
                    with set_recurrent_mode(True):
                        routed = actor.module[0](batch.copy())
                    loss = loss + config.alpha * routed["routing", "cost"].mean()
                    metrics.update(routing_metrics(routed))
                check_finite(loss, update)
                optimizer.zero_grad()
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(loss_module.parameters(), config.max_grad_norm)
                optimizer.step()
        actor.eval()
        metrics.update({f"train/{k}": v.mean().item() for k, v in losses.items()})
        metrics.update({"train/loss": loss.item(), "train/grad_norm": grad_norm.item()})
        return metrics

    batches = segment_batches(actor, config, run.start_update, expert=False, salt=1)
    run.fit(batches, train_step, modules, optimizer, EpisodeStats(levels=config.levels))
    return run.dir
