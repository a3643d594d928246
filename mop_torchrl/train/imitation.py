"""Online imitation of the BabyAI bot: DAgger with an aggregated dataset.

Each update: a TorchRL ``Collector`` steps ``num_envs`` envs for ``unroll_len`` steps with the
student acting (greedy by default; with probability β the bot acts instead, DAgger's mixing);
the bot in each env worker labels every step with ``expert_action``. The batch joins the DAgger
dataset (:class:`~mop_torchrl.train.dagger.DaggerDataset`, a TorchRL replay buffer of the last
``buffer_frames`` frames, saved with every checkpoint), and ``updates_per_batch`` optimizer
updates follow, each on slices sampled from it: :class:`~mop_torchrl.train.losses.ImitationLoss`
(cross-entropy to the labels, ``-1`` ignored, recomputed in recurrent mode from the hidden
states stored at collection time: truncated BPTT; plus the routing cost for MoP).

Why replay: with one update per fresh batch, consecutive batches continue the same episodes
and the policy never learns to read the mission (GoToLocal held-out label accuracy 0.651 with
true vs 0.656 with shuffled missions); aggregating the rollouts, as DAgger prescribes, fixes it.
"""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

import torch
from tensordict.nn import TensorDictSequential
from torch import nn

from mop_torchrl.train.collection import segment_batches
from mop_torchrl.train.config import TrainConfig
from mop_torchrl.train.dagger import BotMixer, DaggerDataset, linear_decay
from mop_torchrl.train.losses import imitation_loss, learner_autocast, total_loss
from mop_torchrl.train.policy import build_policy
from mop_torchrl.train.run import Run, check_finite
from mop_torchrl.train.stats import EpisodeStats, MetricMeans

__all__ = ["train_imitation"]


def train_imitation(config: TrainConfig, resume: bool = False) -> Path:
    """Runs (or resumes) online imitation (DAgger); returns the run directory."""
    run = Run(config, resume)
    torch.manual_seed(config.seed)
    actor, critic = build_policy(config)
    loss_module = imitation_loss(actor, config)
    # fused: one kernel over all 88 tensors (1.5 ms a step instead of 8.5 here; same math)
    optimizer = torch.optim.Adam(actor.parameters(), lr=config.lr, fused=True)
    modules = {"actor": actor, "critic": critic}
    run.restore(modules, optimizer)

    # per_level: each step's level index ("level", from the level mixture) is replayed too
    keys = [*actor.in_keys, *(["level"] if config.cost_scaling == "per_level" else [])]
    dataset = DaggerDataset(
        keys, config.buffer_frames, config.slice_len, config.burn_in, config.batch_slices
    )
    run.track("dagger", dataset)  # saved with every checkpoint, restored on resume
    mixer = BotMixer(linear_decay(config.dagger_beta, config.dagger_beta_updates, run.start_update))
    student = TensorDictSequential(actor, mixer) if config.dagger_beta > 0 else actor
    batches = segment_batches(student, config, run.start_update, expert=True)
    stats = EpisodeStats(levels=config.levels, total=run.extra.get("episodes", 0))
    metrics = MetricMeans()

    with closing(batches), run.updates(modules, optimizer) as updates:
        for update in updates:
            with updates.phase("collect", update):
                _, data = next(batches)  # [num_envs, unroll_len], every step labelled by the bot
            stats.add(data)
            with updates.phase("train", update):
                dataset.extend(data)
                actor.train()
                lr = linear_decay(config.lr, config.lr_decay_updates, update)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                for _ in range(config.updates_per_batch):
                    batch = dataset.sample()  # [batch_slices, burn_in + slice_len]
                    with learner_autocast(config):
                        losses = loss_module(batch)
                    loss = total_loss(losses)
                    check_finite(loss, update)
                    optimizer.zero_grad()
                    loss.backward()
                    grad_norm = nn.utils.clip_grad_norm_(
                        actor.parameters(), config.max_grad_norm, foreach=True
                    )
                    optimizer.step()
                    if "level" in losses:  # per_level: L_k, cost_k of each level
                        metrics.add_per_level(losses.pop("level"), config.levels, "train/")
                    metrics.add(losses, "train/")
                    metrics.add({"train/loss": loss, "train/grad_norm": grad_norm})
                actor.eval()
            mixer.beta = linear_decay(config.dagger_beta, config.dagger_beta_updates, update + 1)
            metrics.add(
                {
                    "train/dagger_beta": mixer.beta,
                    "train/lr": lr,
                    "train/dataset_frames": len(dataset),
                }
            )
            updates.end(update, data.numel(), metrics, stats)
    return run.dir
