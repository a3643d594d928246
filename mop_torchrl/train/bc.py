"""Behaviour cloning from stored bot demonstrations.

Sequences are sampled from the demo buffer with ``SliceSampler`` (each slice starts with
``is_init``, so the core starts it from a zero state) and the policy is trained in recurrent
mode with the same cross-entropy + routing-cost loss as online imitation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tensordict import TensorDictBase

from mop_torchrl.babyai.demos import open_demos, sample_sequences
from mop_torchrl.train.config import TrainConfig
from mop_torchrl.train.imitation import imitation_step, start_imitation

__all__ = ["train_bc"]


def train_bc(config: TrainConfig, resume: bool = False) -> Path:
    """Runs (or resumes) behaviour cloning from ``config.demos``; returns the run directory."""
    run, actor, optimizer, modules = start_imitation(config, resume)
    buffer, _ = open_demos(config.demos)  # checked (level included) by Run

    def batches() -> Iterator[tuple[int, TensorDictBase]]:
        for update in range(run.start_update, config.num_updates):
            yield update, sample_sequences(buffer, config.batch_slices, config.slice_len)

    run.fit(batches(), imitation_step(actor, optimizer, config), modules, optimizer)
    return run.dir
