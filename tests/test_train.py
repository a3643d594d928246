"""Training loops, checkpoints, resume determinism, config validation and the CLI."""

import json

import pytest
import torch
import yaml

from mop_torchrl.cli import main
from mop_torchrl.train import TrainConfig, load_config, resume, train
from mop_torchrl.train import imitation as imitation_module
from mop_torchrl.train.checkpoint import CheckpointError, load_checkpoint
from mop_torchrl.train.evaluate import evaluate_checkpoint
from mop_torchrl.train.run import NonFiniteLossError, RunError

TINY = {
    "num_envs": 2,
    "unroll_len": 8,
    "mop_layers": "0,8;8,16",
    "mop_intermediate_dim": 16,
    "mop_router_dim": 8,
    "gru_hidden_size": 16,
    "image_channels": 8,
    "instr_dim": 16,
    "eval_episodes": 0,
    "log_interval": 1,
}


def tiny(tmp_path, **kwargs) -> TrainConfig:
    return TrainConfig(**{**TINY, "run_dir": str(tmp_path), **kwargs})


def params(run_dir):
    return load_checkpoint(run_dir / "checkpoint.pt")["model"]["actor"]


def test_resume_is_deterministic(tmp_path):
    straight = train(tiny(tmp_path / "a", num_updates=4, checkpoint_interval=2))
    first_half = train(tiny(tmp_path / "b", num_updates=2, checkpoint_interval=2))
    assert load_checkpoint(first_half)["update"] == 2
    resumed = resume(first_half, {"num_updates": 4})
    assert load_checkpoint(resumed)["update"] == 4
    for name, value in params(straight).items():
        torch.testing.assert_close(params(resumed)[name], value, rtol=0, atol=0, msg=name)
    logged = (resumed / "logs" / "scalars" / "train" / "loss.csv").read_text().splitlines()
    assert len(logged) == 4  # one row per update, none lost or repeated


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    real_loss = imitation_module.imitation_loss
    calls = []

    def poisoned(actor, data, config):
        loss, metrics = real_loss(actor, data, config)
        calls.append(1)
        return (loss * torch.nan if len(calls) == 3 else loss), metrics

    monkeypatch.setattr(imitation_module, "imitation_loss", poisoned)
    config = tiny(tmp_path, num_updates=4, checkpoint_interval=2, updates_per_batch=1)
    with pytest.raises(NonFiniteLossError, match="update 2"):
        train(config)
    saved = load_checkpoint(tmp_path / config.name / "checkpoint.pt")
    assert saved["update"] == 2
    assert all(torch.isfinite(v).all() for v in saved["model"]["actor"].values())


def test_corrupt_and_incompatible_checkpoints(tmp_path):
    run_dir = train(tiny(tmp_path, num_updates=1))
    with pytest.raises(CheckpointError, match="other settings"):
        train(tiny(tmp_path, num_updates=1, policy="gru", run_name=run_dir.name), resume=True)
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(run_dir)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(RunError, match="--resume"):
        train(tiny(tmp_path, num_updates=1, run_name=run_dir.name))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"bogus": 1}, "bogus"),
        ({"num_envs": "abc"}, "num_envs"),
        ({"num_envs": 0}, "num_envs"),
        ({"lr": -1.0}, "lr"),
        ({"policy": "lstm"}, "policy"),
        ({"mop_layers": "16,,32"}, "mop_layers"),
        ({"alpha": -1}, "alpha"),
        ({"algo": "bc"}, "demos"),
        ({"algo": "ppo", "num_envs": 6, "minibatches": 4}, "minibatches"),
        ({"unroll_len": 16, "burn_in": 8, "slice_len": 16}, "burn_in"),
        ({"unroll_len": 16, "buffer_frames": 100}, "buffer_frames"),
        ({"dagger_beta": 1.5}, "dagger_beta"),
        ({"alpha": float("inf")}, "alpha"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_yaml_and_cli_overrides(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"num_envs": 4, "mop_layers": ["16,32", "32,64"], "lr": 1}))
    config = load_config(path, {"seed": 3})
    assert (config.num_envs, config.mop_layers, config.lr, config.seed) == (
        4,
        "16,32;32,64",
        1.0,
        3,
    )
    path.write_text("num_envs: [1, 2]\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(path)])
    assert exit_info.value.code == 2 and "'num_envs'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--num_envs", "abc"])  # argparse names the flag


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_ppo_from_imitation_checkpoint_and_eval_cli(tmp_path, capsys):
    imitation = train(tiny(tmp_path, num_updates=1, run_name="imitation"))
    ppo = train(
        tiny(
            tmp_path,
            algo="ppo",
            num_updates=2,
            minibatches=2,
            ppo_epochs=2,
            alpha=1e-3,
            init_checkpoint=str(imitation / "checkpoint.pt"),
            run_name="ppo",
        )
    )
    losses = (ppo / "logs" / "scalars" / "train" / "loss_objective.csv").read_text()
    assert len(losses.splitlines()) == 2
    main(["eval", "--checkpoint", str(ppo), "--episodes", "3", "--num_envs", "3", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["episodes"] == 3 and 0 <= result["success_rate"] <= 1
    assert result["routing_cost"] > 0


def test_gru_baseline_trains_and_knobs_need_mop(tmp_path):
    run_dir = train(tiny(tmp_path, policy="gru", num_updates=1))
    with pytest.raises(CheckpointError, match="MoP"):
        evaluate_checkpoint(run_dir / "checkpoint.pt", episodes=1, disable_largest=True)
