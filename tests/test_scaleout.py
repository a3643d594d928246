"""Multi-worker collection: weights reach the workers, states and labels stay per worker."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from tensordict import TensorDict
from tiny import tiny_settings
from torchrl.modules import set_recurrent_mode

from mop_torchrl import MoPModule
from mop_torchrl.babyai.policy import policy_parts
from mop_torchrl.train import TrainConfig, train
from mop_torchrl.train.collection import env_factories, segment_batches
from mop_torchrl.train.policy import build_policy

TINY = tiny_settings()
HAS_RAY = importlib.util.find_spec("ray") is not None
CLUSTER = pytest.mark.cluster  # one at a time (tests/conftest.py)


def replay_logits(actor, data):
    """The actor's own recurrent-mode replay of a collected ``[B, T]`` batch."""
    with torch.no_grad(), set_recurrent_mode(True):
        return policy_parts(actor).logits(data.copy())["logits"]


def head(actor) -> torch.nn.Linear:
    return [m for m in actor.modules() if isinstance(m, torch.nn.Linear)][-1]


def assert_states_flow(core: MoPModule, batches):
    """Within each row (one env), the stored state at t+1 is ("next", state) at t, also across
    batches; states are zero at is_init."""
    data = torch.cat(batches, dim=1)
    is_init = data["is_init"].squeeze(-1)
    for key in core.state_keys:
        stored, nxt = data[key], data["next", *key]
        assert (stored[is_init] == 0).all()
        carried = ~is_init[:, 1:]
        torch.testing.assert_close(stored[:, 1:][carried], nxt[:, :-1][carried])
        assert nxt.abs().sum() > 0, "recurrence must be alive"


def assert_labels_from_own_bot(config, data, seed):
    """Each row replays, in this process, as worker ``w``'s own env (same seed, same actions):
    same observations and the same bot labels."""
    factories = env_factories(config, expert=True, seed=seed)
    per_worker = config.num_envs // len(factories)
    for worker, make_env in enumerate(factories):
        env = make_env()
        td = env.reset()
        rows = data[worker * per_worker : (worker + 1) * per_worker]
        for t in range(config.unroll_len):
            step = rows[:, t].reshape(env.batch_size)
            torch.testing.assert_close(td["image"], step["image"])
            torch.testing.assert_close(td["expert_action"], step["expert_action"])
            td["action"] = step["action"]
            _, td = env.step_and_maybe_reset(td)
        env.close()


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("distributed", marks=CLUSTER),
        "multiprocess",
        pytest.param(
            "ray",
            marks=[
                CLUSTER,
                pytest.mark.skipif(
                    not HAS_RAY,
                    reason="ray is not installed (pip install 'mop-torchrl[distributed]')",
                ),
            ],
        ),
    ],
)
@pytest.mark.subprocess
@pytest.mark.slow
def test_weights_reach_workers_and_states_stay_per_worker(backend):
    config = TrainConfig.from_dict(
        # sync: each batch follows the weights pushed just before it (overlapped collection's
        # one-update lag is tested in test_overlap.py)
        {
            **TINY,
            "num_envs": 4,
            "backend": backend,
            "num_workers": 2,
            "num_updates": 3,
            "collection": "sync",
        }
    )
    actor = build_policy(config)[0].eval()
    core = next(m for m in actor.modules() if isinstance(m, MoPModule))
    batches = segment_batches(actor, config, start=0, expert=True)
    try:
        # 1) the first batch already comes from the learner's weights, not the workers' own
        _, first = next(batches)
        assert first.batch_size == (4, 8)
        torch.testing.assert_close(first["logits"], replay_logits(actor, first))

        # 2) an update that changes every weight: the next batch follows the new weights
        old = TensorDict.from_module(actor).clone()
        with torch.no_grad():
            for p in actor.parameters():
                p.add_(0.5 * torch.randn_like(p))
        _, second = next(batches)
        torch.testing.assert_close(second["logits"], replay_logits(actor, second))
        with old.to_module(actor):
            stale = replay_logits(actor, second)
        assert not torch.allclose(second["logits"], stale, atol=1e-3)

        # 3) zeroed head: the logits are exactly its bias
        with torch.no_grad():
            head(actor).weight.zero_()
            head(actor).bias.copy_(torch.arange(7.0))
        _, third = next(batches)
        assert (third["logits"] == torch.arange(7.0)).all()
    finally:
        batches.close()

    assert_states_flow(core, [first, second, third])
    assert_labels_from_own_bot(config, first, seed=config.seed + 7919)


def test_config_validates_workers():
    with pytest.raises(ValueError, match="num_workers"):
        TrainConfig(num_envs=4, num_workers=3, backend="multiprocess")
    with pytest.raises(ValueError, match="multi-worker backend"):
        TrainConfig(num_envs=4, num_workers=2)
    with pytest.raises(ValueError, match="backend"):
        TrainConfig(backend="mpi")


@pytest.mark.subprocess
@pytest.mark.slow
def test_train_multiprocess_end_to_end(tmp_path):
    config = TrainConfig.from_dict(
        tiny_settings(
            backend="multiprocess",
            num_workers=2,
            num_updates=2,
            run_dir=str(tmp_path),
        )
    )
    run_dir = train(config)
    assert (run_dir / "checkpoint.pt").exists()
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert payload["update"] == 2 and payload["frames"] == 2 * 2 * 8


@pytest.mark.skipif(
    not HAS_RAY, reason="ray is not installed (pip install 'mop-torchrl[distributed]')"
)
@pytest.mark.subprocess
@pytest.mark.slow
@CLUSTER
def test_ray_run_prints_a_screenful(tmp_path):
    """Worker output stays quiet by default: Ray prefixed each worker log line with the
    collector's ~145-line repr (~1,900 lines for 6 updates); the whole run now fits a screen."""
    flags = {**TINY, "backend": "ray", "num_workers": 2, "num_updates": 2, "log_interval": 1}
    cmd = [sys.executable, "-m", "mop_torchrl.cli", "train", "--run_dir", str(tmp_path)]
    for key, value in flags.items():
        cmd += [f"--{key}", str(value)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local Ray
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    lines = output.splitlines()
    assert len(lines) <= 50, f"{len(lines)} lines of output:\n" + "\n".join(lines[:80])
    assert not any("TransformedEnv(" in line for line in lines)
