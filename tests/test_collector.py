"""MoPModule inside real TorchRL pipelines: collector, primers, replay buffer replay."""

import pytest
import torch
from tensordict.nn import TensorDictModule, TensorDictSequential
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import LazyMemmapStorage, SliceSampler, TensorDictReplayBuffer
from torchrl.envs import GymEnv, InitTracker, TransformedEnv
from torchrl.modules import set_recurrent_mode
from torchrl.modules.utils import get_primers_from_module

from mop_torchrl import MoPConfig, MoPModule

CONFIG = MoPConfig(input_dim=4, layers="0,8,16;8,16", intermediate_dim=16, router_dim=8)


def make_policy(seed=0) -> tuple[MoPModule, TensorDictSequential]:
    torch.manual_seed(seed)
    core = MoPModule(CONFIG, in_key="observation", out_key="features").eval()
    head = TensorDictModule(nn.Linear(16, 2), ["features"], ["logits"])
    act = TensorDictModule(lambda logits: logits.argmax(-1), ["logits"], ["action"])
    return core, TensorDictSequential(core, head, act)


def cartpole(**kwargs):
    return GymEnv("CartPole-v1", categorical_action_encoding=True, **kwargs)


def collect(env, policy, frames=96):
    collector = Collector(
        env,
        policy,
        frames_per_batch=frames,
        total_frames=frames,
        auto_register_policy_transforms=True,
    )
    data = next(iter(collector))
    collector.shutdown()
    return data


def assert_state_flows(core: MoPModule, data):
    """Within an episode the stored state at t+1 is ("next", state) at t; zero at is_init."""
    is_init = data["is_init"].squeeze(-1)
    assert is_init[0] and is_init[1:].any(), "the batch should span several episodes"
    for key in core.state_keys:
        stored, nxt = data[key], data["next", *key]
        assert (stored[is_init] == 0).all()
        carried = ~is_init[1:]
        torch.testing.assert_close(stored[1:][carried], nxt[:-1][carried])
        assert nxt.abs().sum() > 0, "recurrence must be alive"


def test_collector_auto_registers_primer_and_propagates_state():
    core, policy = make_policy()
    env = TransformedEnv(cartpole(), InitTracker())
    env.set_seed(0)
    data = collect(env, policy)
    assert_state_flows(core, data)


def test_env_policy_argument_and_get_primers_from_module():
    core, policy = make_policy()
    env = cartpole(policy=policy)  # TorchRL adds InitTracker and the primer by itself
    env.set_seed(0)
    assert_state_flows(core, env.rollout(60, policy, break_when_any_done=False))
    primer = get_primers_from_module(policy)
    assert ("recurrent_state", "block1", "expert1") in primer.primers.keys(True, True)


def test_collector_without_primer_raises():
    _, policy = make_policy()
    env = TransformedEnv(cartpole(), InitTracker())
    collector = Collector(
        env, policy, frames_per_batch=8, total_frames=8, auto_register_policy_transforms=False
    )
    with pytest.raises(KeyError, match="primer"):
        next(iter(collector))
    collector.shutdown()


def test_replay_buffer_recurrent_replay_reproduces_collection(tmp_path):
    core, policy = make_policy()
    env = TransformedEnv(cartpole(), InitTracker())
    env.set_seed(1)
    data = collect(env, policy, frames=200)
    buffer = TensorDictReplayBuffer(
        storage=LazyMemmapStorage(1000, scratch_dir=tmp_path),
        sampler=SliceSampler(slice_len=8, traj_key=("collector", "traj_ids"), strict_length=True),
        batch_size=32,
    )
    buffer.extend(data)
    torch.manual_seed(0)
    sample = buffer.sample().reshape(4, 8)
    assert sample["is_init"][:, 0].all(), "SliceSampler marks slice starts with is_init"
    collected = sample["features"].clone()
    with set_recurrent_mode(True):
        replay = core(sample.exclude("features"))
    torch.testing.assert_close(replay["features"], collected, atol=1e-5, rtol=1e-5)
