"""Training loops, checkpoints, resume determinism, config validation and the CLI."""

import json

import pytest
import torch
import yaml

from mop_torchrl.cli import main
from mop_torchrl.train import load_config, resume, train
from mop_torchrl.train.checkpoint import CheckpointError, load_checkpoint
from mop_torchrl.train.evaluate import evaluate_checkpoint
from mop_torchrl.train.losses import ImitationLoss
from mop_torchrl.train.run import NonFiniteLossError
from mop_torchrl.train.run_folder import RunError


def params(run_dir):
    return load_checkpoint(run_dir / "checkpoint.pt")["model"]["actor"]


def test_resume_without_checkpoint_is_refused_and_keeps_the_logs(tmp_path, tiny_config):
    """A run killed before its first checkpoint is not silently restarted from 0 (that cut
    its logs): resuming it is refused with how to start over; ``--overwrite`` starts over."""
    config = tiny_config(num_updates=2, checkpoint_interval=100)
    old_logs = tmp_path / config.name / "logs" / "scalars" / "train"
    old_logs.mkdir(parents=True)
    (old_logs / "loss.csv").write_text("1,5.0\n2,4.0\n3,3.")  # the last row cut by the kill
    (tmp_path / config.name / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    with pytest.raises(RunError, match=r"checkpoint\.pt is missing, but it holds logs/"):
        resume(tmp_path / config.name)
    assert (old_logs / "loss.csv").read_text() == "1,5.0\n2,4.0\n3,3."
    run_dir = train(config, overwrite=True)
    rows = (run_dir / "logs" / "scalars" / "train" / "loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["1", "2"] and "1,5.0" not in rows


def test_overwrite_deletes_only_run_directories(tmp_path, tiny_config):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(RunError, match="not a run directory"):
        train(tiny_config(num_updates=1, run_name="mine"), overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_legacy_checkpoint_with_numpy_rng_state_loads_data_only(tmp_path):
    import numpy as np

    path = tmp_path / "old.pt"
    legacy = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": (3, ())}
    torch.save(
        {"format": "mop_torchrl.checkpoint/1", "config": {}, "model": {}, "optimizer": {},
         "update": 1, "rng": legacy},
        path,
    )  # fmt: skip
    assert load_checkpoint(path)["rng"]["numpy"][0] == "MT19937"


@pytest.mark.parametrize("bad_call, kept", [(3, "the checkpoint of update 2 was kept"),
                                             (1, "no checkpoint was written yet")])  # fmt: skip
def test_non_finite_loss_stops_and_keeps_last_checkpoint(
    tmp_path, monkeypatch, bad_call, kept, tiny_config
):
    real_forward = ImitationLoss.forward
    calls = []

    def poisoned(self, data):
        losses = real_forward(self, data)
        calls.append(1)
        if len(calls) == bad_call:
            losses["loss_imitation"] = losses["loss_imitation"] * torch.nan
        return losses

    monkeypatch.setattr(ImitationLoss, "forward", poisoned)
    config = tiny_config(num_updates=4, checkpoint_interval=2, updates_per_batch=1)
    with pytest.raises(NonFiniteLossError, match=f"update {bad_call - 1}: stopping; {kept}"):
        train(config)
    checkpoint = tmp_path / config.name / "checkpoint.pt"
    if bad_call == 1:
        assert not checkpoint.exists()
        return
    saved = load_checkpoint(checkpoint)
    assert saved["update"] == 2
    assert all(torch.isfinite(v).all() for v in saved["model"]["actor"].values())


def test_corrupt_and_incompatible_checkpoints(tmp_path, tiny_config):
    run_dir = train(tiny_config(num_updates=1))
    with pytest.raises(CheckpointError, match="other settings"):
        train(tiny_config(num_updates=1, policy="gru", run_name=run_dir.name), resume=True)
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(run_dir)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(RunError, match="--resume"):
        train(tiny_config(num_updates=1, run_name=run_dir.name))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"bogus": 1}, "bogus"),
        ({"num_envs": "abc"}, "num_envs"),
        ({"num_envs": 0}, "num_envs"),
        ({"lr": -1.0}, "lr"),
        ({"policy": "lstm"}, "policy"),
        ({"mop_layers": "16,,32"}, "mop.layers"),
        ({"alpha": -1}, "alpha"),
        ({"algo": "bc"}, "demos"),
        ({"algo": "ppo", "num_envs": 6, "minibatches": 4}, "minibatches"),
        ({"unroll_len": 16, "burn_in": 8, "slice_len": 16}, "burn_in"),
        ({"unroll_len": 16, "buffer_frames": 100}, "buffer_frames"),
        ({"dagger_beta": 1.5}, "dagger_beta"),
        ({"lr_decay_updates": -1}, "lr_decay_updates"),
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
    assert (config.num_envs, config.mop.layers, config.lr, config.seed) == (
        4,
        [[16, 32], [32, 64]],
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


@pytest.mark.slow
def test_ppo_from_imitation_checkpoint_and_eval_cli(tmp_path, capsys, tiny_config):
    imitation = train(tiny_config(num_updates=1, run_name="imitation"))
    ppo = train(
        tiny_config(
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


@pytest.mark.slow
def test_imitation_starts_from_init_checkpoint(tiny_config):
    source = train(tiny_config(num_updates=1, run_name="source"))
    kwargs = {"num_updates": 1, "lr": 1e-12, "seed": 1}  # (almost) no step: weights stay put
    started = train(tiny_config(run_name="started", init_checkpoint=str(source), **kwargs))
    fresh = train(tiny_config(run_name="fresh", **kwargs))
    actors = [
        load_checkpoint(run / "checkpoint.pt")["model"]["actor"] for run in (source, started, fresh)
    ]
    for name, value in actors[0].items():
        assert torch.allclose(actors[1][name], value, atol=1e-8), name
    assert not all(torch.allclose(actors[2][n], v, atol=1e-8) for n, v in actors[0].items())


def test_gru_baseline_trains_and_knobs_need_mop(tmp_path, tiny_config):
    run_dir = train(tiny_config(policy="gru", num_updates=1))
    with pytest.raises(CheckpointError, match="MoP"):
        evaluate_checkpoint(run_dir / "checkpoint.pt", episodes=1, disable_largest=True)


def test_eval_path_ratio_is_missing_without_a_success():
    from tensordict.nn import TensorDictModule

    from mop_torchrl.train.evaluate import evaluate

    class Done(torch.nn.Module):  # "done" forever: never reaches the ball
        def forward(self, direction):
            return torch.full_like(direction, 6)

    actor = TensorDictModule(Done(), in_keys=["direction"], out_keys=["action"])
    result = evaluate(actor, "GoToRedBall", episodes=2, num_envs=2)
    assert result["episodes"] == 2 and result["success_rate"] == 0.0
    assert result["path_ratio"] is None and result["bot_errors"] == 0
    with pytest.raises(ValueError, match="episodes"):
        evaluate(actor, "GoToRedBall", episodes=0)


def test_eval_samples_actions_on_request_reproducibly():
    from mop_torchrl.babyai.policy import make_policy
    from mop_torchrl.train.evaluate import evaluate

    torch.manual_seed(0)
    actor = make_policy("mop")[0].eval()

    def run(sample: bool) -> dict:
        torch.manual_seed(len(calls))  # the global stream differs per call; the result must not
        calls.append(sample)
        return evaluate(actor, "GoToRedBall", episodes=2, num_envs=2, sample=sample)

    calls: list[bool] = []

    keys = ("success_rate", "mean_length", "routing_cost")
    greedy, again = run(False), run(False)
    sampled, resampled = run(True), run(True)
    assert [greedy[k] for k in keys] == [again[k] for k in keys]
    assert [sampled[k] for k in keys] == [resampled[k] for k in keys]  # seeded by the eval seed
    assert sampled["routing_cost"] != greedy["routing_cost"]  # other actions, other states
