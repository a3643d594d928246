"""Overlapped collection: one batch ahead in a worker process, with a known lag, exactly.

Batch ``k + 1`` is collected while the learner runs update ``k``, with the weights after update
``k - 1``; the first batch of a segment with the current weights. Runs stay deterministic
given their seed, and a fresh-process ``--resume`` stays bit-exact (tests/test_dagger.py runs
it with the overlap on). Sync collection is the default: the lag costs held-out success.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tensordict.nn import InteractionType
from torchrl.envs.utils import set_exploration_type

from mop_torchrl.train import TrainConfig, train
from mop_torchrl.train.checkpoint import load_checkpoint
from mop_torchrl.train.collection import overlaps, segment_batches
from mop_torchrl.train.config import auto_threads
from mop_torchrl.train.policy import build_policy


def _logits(config: TrainConfig, state: dict, batch) -> torch.Tensor:
    """The actor's logits at every stored step, recomputed from the stored hidden states."""
    actor = build_policy(config)[0].eval()
    actor.load_state_dict(state)
    steps = batch.select(*actor.in_keys).reshape(-1).clone()
    with torch.no_grad(), set_exploration_type(InteractionType.DETERMINISTIC):
        return actor(steps)["logits"].reshape(*batch.shape, -1)


@pytest.mark.parametrize("segment", [5, 3])
def test_batch_k_plus_1_is_collected_with_the_weights_after_update_k_minus_1(tiny_config, segment):
    config = tiny_config(num_updates=5, checkpoint_interval=segment, collection="overlap")
    assert overlaps(config)
    actor = build_policy(config)[0]
    weights = []  # weights[j]: the weights after update j - 1

    def update_weights() -> None:  # a distinct weight set per update, far apart
        torch.manual_seed(100 + len(weights))
        with torch.no_grad():
            for param in actor.parameters():
                param.normal_(0, 0.5)
        weights.append(copy.deepcopy(actor.state_dict()))

    update_weights()
    batches = {}
    for update, batch in segment_batches(actor, config, 0, expert=True):
        batches[update] = batch
        update_weights()  # "update `update`"
    for k, batch in batches.items():
        segment_start = k % segment == 0
        used = k if segment_start else k - 1  # lag 1, reset when a segment starts
        for j, state in enumerate(weights):
            same = torch.allclose(_logits(config, state, batch), batch["logits"], atol=1e-5)
            assert same == (j == used), (k, j)


def test_an_overlapped_run_is_deterministic_given_its_seed(tiny_config):
    kwargs = {"num_updates": 4, "checkpoint_interval": 2, "student_action": "sample"}
    kwargs["collection"] = "overlap"
    first = load_checkpoint(train(tiny_config(run_name="a", **kwargs)) / "checkpoint.pt")
    second = load_checkpoint(train(tiny_config(run_name="b", **kwargs)) / "checkpoint.pt")
    for name, value in first["model"]["actor"].items():
        assert torch.equal(second["model"]["actor"][name], value), name


def test_sync_is_the_default_and_overlap_is_for_imitation_only(tiny_config):
    assert not overlaps(tiny_config())
    assert overlaps(tiny_config(collection="overlap"))
    assert not overlaps(tiny_config(algo="ppo", minibatches=1, collection="overlap"))


def test_learner_threads_follow_the_cores():
    sync = TrainConfig(torch_threads=1, collection="sync")
    assert auto_threads(sync, 64) == 1  # envs step in the learner's process
    overlap = TrainConfig(torch_threads=1, collection="overlap")
    assert [auto_threads(overlap, n) for n in (1, 2, 3, 16)] == [1, 1, 2, 4]
    workers = TrainConfig(torch_threads=1, backend="multiprocess", num_workers=8)
    assert [auto_threads(workers, n) for n in (2, 10, 16)] == [1, 2, 4]
    assert TrainConfig(torch_threads=3).torch_threads == 3  # set: kept
    assert TrainConfig().torch_threads >= 1  # 0: resolved, and saved resolved
