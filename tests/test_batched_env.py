"""The in-process batched BabyAI env gives exactly the data of TorchRL's SerialEnv."""

from __future__ import annotations

import functools

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs import Compose, InitTracker, RewardSum, SerialEnv, StepCounter, TransformedEnv

from mop_torchrl.babyai.batched import BabyAIBatchedEnv
from mop_torchrl.babyai.envs import _make_torchrl_env, make_babyai_env, worker_seeds


def _serial_reference(level: str, num_envs: int, seed: int, **options) -> TransformedEnv:
    """What ``make_babyai_env(..., parallel=False)`` built before: SerialEnv of GymWrappers."""
    factories = [
        functools.partial(_make_torchrl_env, None, level=level, seed=s, **options)
        for s in worker_seeds(seed, num_envs)
    ]
    return TransformedEnv(
        SerialEnv(num_envs, factories, device="cpu"),
        Compose(InitTracker(), StepCounter(), RewardSum()),
    )


def _actions(num_envs: int, steps: int) -> torch.Tensor:
    return torch.randint(0, 7, (steps, num_envs), generator=torch.Generator().manual_seed(3))


def _rollout(env, actions: torch.Tensor) -> TensorDict:
    """Steps ``env`` with fixed actions, resetting finished envs as collectors do."""
    out = []
    td = env.reset()
    for action in actions:
        td["action"] = action
        td, next_td = env.step_and_maybe_reset(td)
        out.append(td.clone())
        td = next_td
    return torch.stack(out, 1)


@pytest.mark.parametrize(
    ("level", "options"),
    [
        ("GoToRedBall", {"expert": True, "path_ratio": True}),
        ("GoToLocal,PickupLoc", {"expert": True, "level_weights": [1.0, 2.0]}),
        ("GoToRedBallNoDists", {}),
    ],
)
def test_same_data_as_serial_env(level: str, options: dict) -> None:
    num_envs, steps = 4, 70  # random actions: GoToRedBall episodes end (resets happen)
    batched = make_babyai_env(level, num_envs=num_envs, seed=5, parallel=False, **options)
    serial = _serial_reference(level, num_envs, 5, **options)
    try:
        assert isinstance(batched.base_env, BabyAIBatchedEnv)
        assert batched.specs == serial.specs
        actions = _actions(num_envs, steps)
        got, want = _rollout(batched, actions), _rollout(serial, actions)
        assert got["next", "done"].any(), "no episode ended: the test would not cover resets"
        assert set(got.keys(True, True)) == set(want.keys(True, True))
        for key in want.keys(True, True):
            assert torch.equal(got[key], want[key]), key
    finally:
        batched.close()
        serial.close()


def test_partial_reset_resets_only_flagged_envs() -> None:
    env = make_babyai_env("GoToLocal", num_envs=3, seed=0, parallel=False)
    try:
        td = env.rand_step(env.reset())["next"]
        td["_reset"] = torch.tensor([[False], [True], [False]])
        td = env.reset(td)
        assert td["is_init"].view(-1).tolist() == [False, True, False]
        steps = [gym_env.unwrapped.step_count for gym_env in env.base_env._envs]
        assert steps == [1, 0, 1]
        assert not td["done"].any()
    finally:
        env.close()


def test_set_seed_chains_like_serial_env() -> None:
    batched = make_babyai_env("GoToLocal", num_envs=3, parallel=False)
    serial = _serial_reference("GoToLocal", 3, 0)
    try:
        assert batched.set_seed(11) == serial.set_seed(11)
        got, want = batched.reset(), serial.reset()
        assert torch.equal(got["mission"], want["mission"])
        assert torch.equal(got["image"], want["image"])
    finally:
        batched.close()
        serial.close()


def test_needs_envs() -> None:
    with pytest.raises(ValueError, match="at least one env"):
        BabyAIBatchedEnv([], template=None)
