"""The config tree: MoPConfig (layer specs, presets, round trips, clear errors) and
TrainConfig (nested mop/encoder, flat aliases, old saved configs, the generated command line)."""

import argparse
import dataclasses
import pathlib

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from mop_torchrl import MoPConfig, parse_layers
from mop_torchrl.babyai.policy import EncoderConfig
from mop_torchrl.core.config import ConfigError, format_layers
from mop_torchrl.train.config import (
    FLAT_KEYS,
    RESUMABLE_CHANGES,
    TrainConfig,
    add_config_arguments,
    load_config,
)


def test_spec_forms_agree():
    expected = [[32, 64, 128], [64, 128, 256]]
    assert parse_layers("32,64,128;64,128,256") == expected
    assert parse_layers(["32,64,128", "64,128,256"]) == expected
    assert parse_layers([[32, 64, 128], [64, 128, 256]]) == expected
    assert parse_layers(" 16 , 32 ") == [[16, 32]]
    assert parse_layers("0") == [[0]]  # a pure skip block is allowed


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("32,,64", "'32,,64'"),
        ("a,b", "'a'"),
        ("-4", "'-4'"),
        ("", "''"),
        ("32;", "block 1 is empty"),
        (";", "block 0 is empty"),
        ("16;;8", "block 1 is empty"),
        ("1.5", "'1.5'"),
        ([], "non-empty"),
        (["16,32;8"], "several blocks"),
        ([[16, -1]], "-1"),
        ([[]], "empty"),
    ],
)
def test_bad_layer_specs_name_the_offending_text(spec, fragment):
    with pytest.raises(ValueError) as err:
        MoPConfig(layers=spec)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "field, value",
    [
        ("input_dim", 0),
        ("intermediate_dim", -3),
        ("router_dim", 0),
        ("dropout_gamma", 0.0),
        ("dropout_gamma", 1.5),
        ("dropout_beta", -0.1),
        ("expert_norm", "batch"),
        ("cost_norm", "raw"),
        ("router_dim", 2.5),
        ("cost_exponent", float("nan")),
    ],
)
def test_bad_values_raise(field, value):
    with pytest.raises(ValueError, match=field):
        MoPConfig(**{field: value})


@pytest.mark.parametrize("field, value", [("alpha", -1e-5), ("epsilon", 0.0), ("cost_mode", "log")])
def test_bad_objective_values_raise(field, value):
    """α, ε and the cost mode are the objective's: the training config checks them."""
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_presets_and_round_trip():
    seed = MoPConfig.from_preset("seed", input_dim=64)
    assert (seed.layers, seed.intermediate_dim, seed.router_dim) == (
        [[32, 64, 128], [64, 128, 256]],
        256,
        64,
    )
    paper = MoPConfig.from_preset("paper", dropout_beta=0.0)
    assert paper.layers == [[0, 16, 32]] * 3 and paper.intermediate_dim == 64
    assert paper.dropout_beta == 0.0
    assert MoPConfig.from_dict(seed.to_dict()) == seed
    with pytest.raises(ValueError, match="unknown MoP preset"):
        MoPConfig.from_preset("huge")
    with pytest.raises(ValueError, match="bogus"):
        MoPConfig.from_dict({"bogus": 1})


@given(st.lists(st.lists(st.integers(0, 512), min_size=1, max_size=5), min_size=1, max_size=4))
def test_format_parse_round_trip(layers):
    assert parse_layers(format_layers(layers)) == layers


# ------------------------------------------------------------------------ TrainConfig
# ``TrainConfig().to_dict()`` exactly as the flat config of 6caf3eb (before the tree was nested)
# saved it in every run's config.yaml and checkpoint.
OLD_DEFAULT = {
    "algo": "imitation", "task_id": "BabyAI-GoToRedBall-v0", "level_weights": None,
    "policy": "mop", "seed": 0, "device": "cpu", "torch_threads": 1, "num_envs": 16,
    "env_batching": "serial", "backend": "inprocess", "worker_log_level": "warning",
    "num_workers": 1, "distributed_launcher": "mp", "unroll_len": 32, "num_updates": 300,
    "lr": 0.001, "max_grad_norm": 1.0, "student_action": "greedy", "buffer_frames": 32768,
    "updates_per_batch": 4, "burn_in": 0, "dagger_beta": 0.0, "dagger_beta_updates": 0,
    "mop_preset": "seed", "mop_layers": None, "mop_intermediate_dim": None,
    "mop_router_dim": None, "alpha": 0.01, "cost_norm": "block_max", "epsilon": 0.01,
    "cost_mode": "scaled", "dropout_beta": 0.8, "dropout_gamma": 0.1, "gru_hidden_size": 512,
    "image_channels": 32, "instr_dim": 64, "demos": None, "batch_slices": 16, "slice_len": 32,
    "init_checkpoint": None, "ppo_epochs": 4, "minibatches": 4, "clip_epsilon": 0.2,
    "gamma": 0.99, "gae_lambda": 0.95, "entropy_coef": 0.01, "critic_coef": 0.5,
    "run_dir": "runs", "run_name": None, "log_interval": 10, "checkpoint_interval": 50,
    "eval_episodes": 100, "eval_interval": 0, "eval_interval_episodes": 50, "logger": "csv",
}  # fmt: skip
# The MoP and encoder keys of an old config with overrides (also saved by 6caf3eb), and the
# MoPConfig/EncoderConfig the old code built from it.
OLD_CUSTOM = {
    "task_id": "GoToLocal,GoToRedBall", "mop_preset": "paper", "mop_layers": None,
    "mop_intermediate_dim": None, "mop_router_dim": 16, "alpha": 0.0, "cost_norm": "none",
    "epsilon": 0.01, "cost_mode": "scaled", "dropout_beta": 0.0, "dropout_gamma": 0.1,
    "gru_hidden_size": 512, "image_channels": 8, "instr_dim": 16,
}  # fmt: skip


def test_old_flat_config_loads_and_equals_the_new_default():
    assert TrainConfig.from_dict(OLD_DEFAULT) == TrainConfig()
    old = TrainConfig.from_dict({**OLD_DEFAULT, **OLD_CUSTOM})
    assert old.mop == MoPConfig(
        layers="0,16,32;0,16,32;0,16,32",
        intermediate_dim=64,
        router_dim=16,
        dropout_beta=0.0,
        cost_norm="none",
    )
    assert old.encoder == EncoderConfig(image_channels=8, instr_dim=16)
    assert (old.alpha, old.epsilon, old.cost_mode, old.task_id) == (
        0.0,
        0.01,
        "scaled",
        "GoToLocal,GoToRedBall",
    )
    # ... and what it loads as is saved nested, and loads back the same.
    nested = old.to_dict()
    assert not set(nested) & set(FLAT_KEYS) and nested["mop"]["layers"] == "0,16,32;0,16,32;0,16,32"
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(nested))) == old


def test_nested_flat_and_dotted_keys_agree(tmp_path):
    nested = {"mop": {"preset": "paper", "layers": ["0,8", "8,16"], "router_dim": 8},
              "encoder": {"instr_dim": 16}, "alpha": 0.0}  # fmt: skip
    flat = {"mop_preset": "paper", "mop_layers": "0,8;8,16", "mop_router_dim": 8,
            "instr_dim": 16, "alpha": 0}  # fmt: skip
    dotted = {"mop.preset": "paper", "mop.layers": [[0, 8], [8, 16]], "mop.router_dim": 8,
              "encoder.instr_dim": 16, "alpha": 0.0}  # fmt: skip
    configs = [TrainConfig.from_dict(d) for d in (nested, flat, dotted)]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].mop.intermediate_dim == 64  # the paper preset's, under the overrides
    # A YAML file's section is updated, not replaced, by an override of one nested key.
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(nested))
    assert load_config(path, {"mop_router_dim": 4}).mop.layers == [[0, 8], [8, 16]]
    assert load_config(path, {"mop.router_dim": 4}).mop.router_dim == 4
    with pytest.raises(ValueError, match=r"'mop\.layers' is given twice"):
        TrainConfig.from_dict({"mop_layers": "8", "mop": {"layers": "8"}})


def _parse(*argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return load_config(None, vars(parser.parse_args(argv)))


def test_nested_flags_and_flat_aliases_give_the_same_config():
    nested = _parse(
        "--mop.preset=paper", "--mop.layers=0,8;8,16", "--mop.intermediate_dim=16",
        "--mop.router_dim=8", "--mop.cost_norm=none", "--mop.dropout_beta=0",
        "--mop.dropout_gamma=0.2", "--encoder.image_channels=8", "--encoder.instr_dim=16",
        "--alpha=0", "--task_id=GoToLocal", "--num_envs=4", "--unroll_len=8",
        "--num_updates=3", "--lr=0.01",
    )  # fmt: skip
    flat = _parse(
        "--mop_preset=paper", "--mop_layers=0,8;8,16", "--mop_intermediate_dim=16",
        "--mop_router_dim=8", "--cost_norm=none", "--dropout_beta=0", "--dropout_gamma=0.2",
        "--image_channels=8", "--instr_dim=16", "--alpha=0", "--task_id=GoToLocal",
        "--num_envs=4", "--unroll_len=8", "--num_updates=3", "--lr=0.01",
    )  # fmt: skip
    assert nested == flat
    assert (nested.mop.layers, nested.mop.router_dim, nested.encoder.instr_dim) == (
        [[0, 8], [8, 16]],
        8,
        16,
    )
    assert nested.mop.cost_norm == "none" and nested.alpha == 0.0 and nested.num_updates == 3
    assert _parse() == TrainConfig()  # no flag: every default


def test_help_lists_nested_flags_with_their_help():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "--mop.layers SPEC, --mop_layers SPEC Expert hidden sizes per block" in text
    assert (
        "--encoder.instr_dim INT, --instr_dim INT Instruction GRU hidden size. (default: 64)"
        in text
    )
    assert "--mop.preset {seed,paper}, --mop_preset {seed,paper}" in text
    assert "--alpha FLOAT Routing-cost weight α" in text
    assert "--mop.input_dim" not in text  # set by the policy builder
    assert "(default: the preset's)" in text  # layers, intermediate_dim, router_dim


def test_resumable_changes_come_from_the_field_metadata():
    # run_dir/run_name are not: --resume RUN_DIR names the run.
    today = {
        "num_updates", "log_interval", "eval_episodes", "eval_interval",
        "eval_interval_episodes", "logger", "worker_log_level",
    }  # fmt: skip
    marked = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resumable")}
    assert marked == RESUMABLE_CHANGES == today
    assert all(f.metadata["help"] for f in dataclasses.fields(TrainConfig))


@pytest.mark.parametrize(
    "data, key",
    [
        ({"mop": {"layers": "16,,32"}}, "mop.layers"),
        ({"mop_layers": "16,,32"}, "mop.layers"),
        ({"mop": {"router_dim": 0}}, "mop.router_dim"),
        ({"mop": {"intermediate_dim": "wide"}}, "mop.intermediate_dim"),
        ({"dropout_gamma": 2.0}, "mop.dropout_gamma"),
        ({"mop": {"cost_norm": "raw"}}, "mop.cost_norm"),
        ({"mop": {"preset": "huge"}}, "mop.preset"),
        ({"encoder": {"instr_dim": 0}}, "encoder.instr_dim"),
        ({"image_channels": True}, "encoder.image_channels"),
        ({"mop": {"bogus": 1}}, "mop.bogus"),
        ({"mop": {"input_dim": 8}}, "mop.input_dim"),
        ({"mop": 3}, "'mop' must be a mapping"),
        ({"alpha": float("inf")}, "'alpha' must be finite"),
    ],
)
def test_bad_nested_value_names_its_key(data, key):
    with pytest.raises(ValueError) as err:
        TrainConfig.from_dict(data)
    assert key in str(err.value)
    if isinstance(err.value, ConfigError):
        assert str(err.value).startswith(f"config key {err.value.key!r}")


def test_checkpoint_written_before_the_layering_still_evaluates(tmp_path, capsys):
    """tests/data/checkpoint_v0.2.pt was written by v0.2 (3c419e7: flat config, old module
    paths) with a tiny MoP; the current package loads it and ``eval`` runs it."""
    import json
    import shutil

    from mop_torchrl.cli import main
    from mop_torchrl.train.policy import load_actor

    path = tmp_path / "checkpoint.pt"
    shutil.copy(pathlib.Path(__file__).parent / "data" / "checkpoint_v0.2.pt", path)
    _, config = load_actor(path)
    assert config.mop.layers == [[0, 4], [4, 8]] and config.encoder.instr_dim == 8
    main(["eval", "--checkpoint", str(path), "--episodes", "2", "--num_envs", "2", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["episodes"] == 2 and 0.0 <= result["success_rate"] <= 1.0


SHIPPED_CONFIGS = sorted((pathlib.Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    """Every shipped recipe loads and passes validation (a typo in a key, or a combination the
    trainer refuses, such as the bot acting with a multi-worker backend, fails here rather than
    minutes into a user's run)."""
    config = load_config(path)
    assert config.num_updates > 0 and config.levels


def test_boolean_flag_and_its_saved_default(tmp_path):
    assert _parse("--train_path_ratio", "true").train_path_ratio is True
    assert _parse("--train_path_ratio=FALSE").train_path_ratio is False
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--train_path_ratio", "yes"])
    # A run saved before the key existed logged the path ratio: resuming it keeps doing so.
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump({"task_id": "GoToLocal"}))
    assert load_config(saved, saved=True).train_path_ratio is True
    assert load_config(saved).train_path_ratio is False


def test_autocast_auto_follows_the_hardware_and_is_saved_resolved(monkeypatch):
    import mop_torchrl.train.config as config_module

    for native, expected in [(True, "bfloat16"), (False, "off")]:
        monkeypatch.setattr(config_module, "native_bfloat16", lambda device, n=native: n)
        config = TrainConfig(autocast="auto")
        assert config.autocast == expected
        assert TrainConfig.from_dict(config.to_dict()).autocast == expected
        assert TrainConfig(autocast="auto", algo="ppo").autocast == "off"
    with pytest.raises(ConfigError, match=r"autocast.*ppo"):
        TrainConfig(autocast="bfloat16", algo="ppo")
    assert config_module.native_bfloat16("meta") is False
