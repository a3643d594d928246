"""The run folder as the unit of trust: verified buffer dumps, no pickle read from a run folder,
``--overwrite`` that validates first and deletes only a run, ``--resume`` that never restarts
a run from 0, and one-line errors for bad levels, seeds and sizes (issue 24, items 3-6, 9-11).

The user-facing cases drive the real ``mop-torchrl`` console script on real files (truncated
with ``os.truncate``, edited JSON, random bytes) and check the one line on stderr, the exit
code, and that nothing in the run folder changed.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from console import assert_one_line_error, cli
from tensordict import TensorDict
from tiny import tiny_flags, tiny_settings

from mop_torchrl.train import TrainConfig
from mop_torchrl.train.checkpoint import (
    CheckpointError,
    dump_digests,
    load_checkpoint,
    save_checkpoint,
    verify_dump,
)
from mop_torchrl.train.dagger import DaggerDataset, DumpError, check_dump
from mop_torchrl.train.run_folder import RunError, check_deletable

DUMP = "buffers/dagger-00000002"


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root``: sha256 and mtime (a lock file of the run is left out)."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and "lock" not in p.name
    }


class _Exploit:
    marker: Path

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_pickle(path: Path, marker: Path) -> None:
    """A ``prefetch.pkl`` as TorchRL's ``ReplayBuffer.loads`` would unpickle it."""
    exploit = _Exploit()
    exploit.marker = marker
    path.write_bytes(pickle.dumps({"queue": [exploit]}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A tiny imitation run of 2 updates with its checkpoint and buffer dump, made once."""
    root = tmp_path_factory.mktemp("trained")
    result = cli(
        "train", *tiny_flags(num_updates=2, checkpoint_interval=2), "--run_dir", root,
        "--run_name", "run",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return root / "run", result


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A fresh copy of the trained run folder."""
    return Path(shutil.copytree(trained[0], tmp_path / "run", symlinks=True))


# ------------------------------------------------------------------ items 3 and 4: dumps
def _truncate(dump: Path) -> str:
    image = dump / "storage" / "image.memmap"
    os.truncate(image, image.stat().st_size // 2)
    return "image.memmap' has"


def _edit_len(dump: Path) -> str:
    meta = dump / "storage" / "storage_metadata.json"
    text = meta.read_text()
    assert '"len": 32' in text
    meta.write_text(text.replace('"len": 32', '"len": 10'))  # as many bytes: the digest tells
    return "storage_metadata.json' does not match its sha256"


def _random_bytes(dump: Path) -> str:
    image = dump / "storage" / "image.memmap"
    with open(image, "r+b") as f:
        f.seek(100)
        f.write(os.urandom(64))
    return "image.memmap' does not match its sha256"


def _extra_pickle(dump: Path) -> str:
    plant_pickle(dump / "prefetch.pkl", dump.parents[2] / "pwned")
    return "prefetch.pkl' is not part of the buffer dump"


def _missing(dump: Path) -> str:
    (dump / "writer" / "metadata.json").unlink()
    return "writer/metadata.json' of the buffer dump checkpoint"


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("damage", [_truncate, _edit_len, _random_bytes, _extra_pickle, _missing])
def test_a_damaged_buffer_dump_is_refused_and_left_as_it_is(run, damage):
    match = damage(run / DUMP)
    before = snapshot(run)
    result = cli("train", "--resume", run, "--num_updates", 3)
    assert_one_line_error(result, match)
    assert snapshot(run) == before  # nothing rewritten: not the memmap, logs or config.yaml
    assert not (run.parent / "pwned").exists()


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_checkpoint_without_digests_resumes_with_a_warning_and_never_unpickles(run):
    """Checkpoints written before the digests: the dump's layout is checked (a truncated file is
    still refused), a warning says so, and the ``prefetch.pkl`` TorchRL wrote is never read."""
    payload = load_checkpoint(run)
    del payload["buffer_files"], payload["format"]
    save_checkpoint(run / "checkpoint.pt", payload)
    marker = run.parent / "pwned"
    plant_pickle(run / DUMP / "prefetch.pkl", marker)
    image = run / DUMP / "storage" / "image.memmap"
    size = image.stat().st_size
    os.truncate(image, size - 147)
    result = cli("train", "--resume", run, "--num_updates", 3)
    assert_one_line_error(result, "image.memmap' has")
    assert image.stat().st_size == size - 147  # not regrown
    os.truncate(image, size)  # (zeros: same layout)
    result = cli("train", "--resume", run, "--num_updates", 3)
    assert result.returncode == 0, result.stderr
    assert "predates buffer-dump digests" in result.stderr
    assert not marker.exists()
    resumed = load_checkpoint(run)
    assert resumed["update"] == 3 and set(resumed["buffer_files"]) == {"dagger"}


def _dataset() -> DaggerDataset:
    return DaggerDataset(["obs", "is_init"], frames=32, slice_len=4, burn_in=2, batch_slices=3)


def _filled() -> DaggerDataset:
    data = TensorDict(
        obs=torch.randn(6, 8, 3),
        is_init=torch.zeros(6, 8, 1, dtype=torch.bool),
        expert_action=torch.randint(7, (6, 8)),
        batch_size=[6, 8],
    )
    dataset = _dataset()
    dataset.extend(data)
    return dataset


def test_a_dump_holds_no_pickle_and_restores_the_same_samples(tmp_path):
    dataset = _filled()
    dataset.dumps(tmp_path / "dump")
    files = dump_digests(tmp_path / "dump")
    assert files and not [name for name in files if name.endswith((".pkl", ".pt", ".t"))]
    restored = _dataset()
    restored.loads(tmp_path / "dump")
    assert len(restored) == len(dataset) == 32 and restored._segments == dataset._segments
    torch.manual_seed(0)
    a = dataset.sample()
    torch.manual_seed(0)
    assert (restored.sample() == a).all()
    assert dump_digests(tmp_path / "dump") == files  # loading wrote nothing
    verify_dump(tmp_path / "dump", files, "ckpt")


def test_dump_checks_name_the_file(tmp_path):
    _filled().dumps(tmp_path / "dump")
    files = dump_digests(tmp_path / "dump")
    obs = tmp_path / "dump" / "storage" / "obs.memmap"
    os.truncate(obs, 100)
    with pytest.raises(DumpError, match=r"obs\.memmap' has 100 bytes"):
        check_dump(tmp_path / "dump")
    with pytest.raises(CheckpointError, match=r"obs\.memmap' has 100 bytes, but checkpoint"):
        verify_dump(tmp_path / "dump", files, "ckpt")
    with pytest.raises(DumpError, match=r"obs\.memmap' has 100 bytes"):
        _dataset().loads(tmp_path / "dump")  # an old dump: never regrown
    assert obs.stat().st_size == 100
    link = tmp_path / "dump" / "writer" / "extra"
    link.symlink_to(obs)
    with pytest.raises(CheckpointError, match="extra' is not part of the buffer dump"):
        verify_dump(tmp_path / "dump", files, "ckpt")


# ------------------------------------------------------------------ item 6: no checkpoint
@pytest.mark.subprocess
@pytest.mark.slow
def test_resume_without_a_checkpoint_is_refused_not_restarted(run):
    (run / "checkpoint.pt").unlink()
    before = snapshot(run)
    result = cli("train", "--resume", run)
    assert_one_line_error(result, "checkpoint.pt is missing, but it holds logs/ and buffers/")
    assert "--overwrite" in result.stderr
    assert snapshot(run) == before


# ------------------------------------------------------------------ item 5: --overwrite
@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, match, code",
    [
        (["--seed", "99999999999999999999"], "config key 'seed' must be in [0, 4294967295]", 2),
        (["--run_name", ".."], "config key 'run_name' must be one directory name", 2),
        (["--task_id", "GoToNowhere"], "Unknown BabyAI level 'GoToNowhere'", 1),
    ],
)
def test_overwrite_validates_everything_before_deleting(run, flags, match, code):
    before = snapshot(run.parent)
    args = ["train", *tiny_flags(num_updates=1), "--run_dir", run.parent, "--run_name", "run"]
    result = cli(*args, *flags, "--overwrite")
    assert_one_line_error(result, match, code)
    assert snapshot(run.parent) == before


def _config(run_dir: Path, name: str, **overrides) -> TrainConfig:
    return TrainConfig.from_dict(tiny_settings(run_dir=str(run_dir), run_name=name, **overrides))


@pytest.mark.subprocess  # the trained run folder
@pytest.mark.slow
def test_overwrite_deletes_only_a_run_of_this_package_inside_run_dir(run, tmp_path, monkeypatch):
    check_deletable(_config(tmp_path, "run"))  # a run: config.yaml, checkpoint, logs, buffers
    (tmp_path / "link").symlink_to(run)
    with pytest.raises(RunError, match="it is a symbolic link"):
        check_deletable(_config(tmp_path, "link"))
    monkeypatch.chdir(run / "logs")
    with pytest.raises(RunError, match="it holds the working directory"):
        check_deletable(_config(tmp_path, "run"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunError, match="it holds --init_checkpoint"):
        check_deletable(
            _config(tmp_path, "run", algo="ppo", minibatches=2, init_checkpoint=str(run))
        )
    foreign = tmp_path / "notes"
    (foreign / "logs").mkdir(parents=True)
    (foreign / "config.yaml").write_text("documentclass: article\n")
    with pytest.raises(RunError, match="not a run directory"):
        check_deletable(_config(tmp_path, "notes"))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(RunError, match=r"no checkpoint.pt, logs/ or buffers/"):
        check_deletable(_config(tmp_path, "bare"))
    assert (run / "checkpoint.pt").is_file() and (foreign / "config.yaml").is_file()


# ------------------------------------------------------------------ items 9-11: one line
@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, yaml_text, match",
    [
        (["--task_id", ""], None, "config key 'task_id': names no level"),
        (["--task_id", ","], None, "config key 'task_id': names no level"),
        ([], "task_id: []\n", "config key 'task_id': names no level"),
        (["--seed=-1"], None, "config key 'seed' must be in [0, 4294967295]"),
        (["--seed", str(2**64)], None, "config key 'seed' must be in [0, 4294967295]"),
        (
            ["--task_id", "GoToRedBall,GoToLocal", "--level_weights", "1,2,3"],
            None,
            "config key 'level_weights': 3 level weights given for 2 levels",
        ),
        (["--buffer_frames", "8"], None, "'buffer_frames' must hold at least one collected batch"),
        (["--num_envs", "100000"], None, "config key 'num_envs' must be at most 1024"),
    ],
)
def test_config_errors_are_one_line_and_leave_nothing(tmp_path, flags, yaml_text, match):
    runs = tmp_path / "runs"
    args = ["train", *tiny_flags(), "--run_dir", runs, *flags]
    if yaml_text is not None:
        (tmp_path / "config.yaml").write_text(yaml_text + f"run_dir: {runs}\n")
        args = ["train", "--config", tmp_path / "config.yaml"]
    assert_one_line_error(cli(*args), match, 2)
    assert not runs.exists()


@pytest.mark.subprocess
@pytest.mark.slow
def test_eval_arguments_are_checked_before_evaluating(trained):
    result = cli("eval", "--checkpoint", trained[0], "--probe_episodes", -1)
    assert_one_line_error(result, "--probe_episodes: expected an integer >= 0", 2)
    result = cli("eval", "--checkpoint", trained[0], "--seed=-2000000")
    assert_one_line_error(result, "--seed: expected an integer in [0, 4294967295]", 2)


def test_evaluate_checkpoint_checks_its_arguments_first(tmp_path):
    from mop_torchrl.train.evaluate import evaluate_checkpoint

    missing = tmp_path / "none.pt"  # never opened: the arguments are checked first
    with pytest.raises(ValueError, match="probe_episodes must be >= 0"):
        evaluate_checkpoint(missing, probe_episodes=-1)
    with pytest.raises(ValueError, match="seed must be in"):
        evaluate_checkpoint(missing, seed=-2_000_000)


# ------------------------------------------------------------------ item 10
@pytest.mark.subprocess
@pytest.mark.slow
def test_resume_refuses_a_new_place_instead_of_ignoring_it(run):
    before = snapshot(run)
    result = cli("train", "--resume", run, "--run_name", "elsewhere")
    assert_one_line_error(result, "--resume RUN_DIR names the run to continue: drop --run_name", 2)
    result = cli("train", "--resume", run, "--run_dir", run.parent / "other")
    assert_one_line_error(result, "drop --run_dir", 2)
    assert snapshot(run) == before and not (run.parent / "elsewhere").exists()


@pytest.mark.subprocess  # the trained run folder
@pytest.mark.slow
def test_a_moved_run_folder_still_resumes(run, tmp_path, monkeypatch):
    """run_dir/run_name are where the run lives, not settings: a copied folder validates, and
    ``--resume .`` names the directory itself (not the default run name)."""
    from mop_torchrl.train import resume_config
    from mop_torchrl.train.run_folder import validate_start

    moved = Path(shutil.copytree(run, tmp_path / "moved" / "renamed"))
    config = resume_config(moved, {"num_updates": 3})
    assert validate_start(config, resume=True)["update"] == 2
    monkeypatch.chdir(moved)
    config = resume_config(".")
    assert config.name == "renamed" and validate_start(config, resume=True)["update"] == 2


@pytest.mark.subprocess
@pytest.mark.slow
def test_unreadable_checkpoint_message_gives_no_unsafe_advice(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    plant_pickle(path, marker)
    result = cli("eval", "--checkpoint", path)
    assert_one_line_error(result, "not data-only: it holds more than tensors and plain data")
    assert "weights_only" not in result.stderr and "likely succeed" not in result.stderr
    assert not marker.exists()


@pytest.mark.subprocess
@pytest.mark.slow
def test_demos_leave_no_lock_in_a_folder_they_refuse(tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("precious")
    result = cli("demos", "--task_id", "GoToRedBall", "--episodes", 1, "--out", out, "--quiet")
    assert_one_line_error(result, "is not empty and has no demos.json")
    assert sorted(p.name for p in out.iterdir()) == ["chapter1.tex"]


@pytest.mark.subprocess  # the trained run folder
@pytest.mark.slow
def test_training_console_has_no_storage_info_line(trained):
    assert "LazyTensorStorage" not in trained[1].stderr


class _FakeRayCollector:
    calls: ClassVar[list[dict]] = []

    def __init__(self, *args, **kwargs):
        from torchrl.collectors.utils import _NON_NN_POLICY_WEIGHTS

        type(self).calls.append(kwargs)
        warnings.warn(_NON_NN_POLICY_WEIGHTS, stacklevel=1)
        warnings.warn("another torchrl warning", stacklevel=1)


@pytest.mark.parametrize("address", [None, "ray://cluster:10001"])
def test_ray_starts_a_fresh_local_ray_and_drops_only_the_false_warning(monkeypatch, address):
    import torchrl.collectors.distributed as distributed
    from tensordict.nn import InteractionType

    from mop_torchrl.train.collection import make_collector

    monkeypatch.setattr(distributed, "RayCollector", _FakeRayCollector)
    if address is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
    config = TrainConfig.from_dict(tiny_settings(backend="ray", num_workers=2))
    _FakeRayCollector.calls.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_collector(config, None, [None, None], 16, InteractionType.DETERMINISTIC)
    assert _FakeRayCollector.calls[0]["ray_init_config"]["address"] == (address or "local")
    assert [str(w.message) for w in caught] == ["another torchrl warning"]


@pytest.mark.slow
def test_seed_range_ends_where_numpy_seeds_end(tmp_path):
    """The largest seed trains (the env seeds derived from it leave 32 bits); one more is
    refused by the config."""
    from mop_torchrl.train import train

    top = _config(tmp_path, "top", seed=2**32 - 1, num_updates=1)
    assert load_checkpoint(train(top))["update"] == 1
    with pytest.raises(ValueError, match="'seed' must be in"):
        _config(tmp_path, "x", seed=2**32)


def test_a_missing_init_checkpoint_is_named_before_anything_is_written(tmp_path):
    from mop_torchrl.train.run_folder import validate_start

    config = _config(tmp_path, "curriculum", init_checkpoint=str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="--init_checkpoint: no checkpoint at"):
        validate_start(config, resume=False)
    assert not (tmp_path / "curriculum").exists()
