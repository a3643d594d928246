"""The ``mop-torchrl`` console script under bad input, kills and a hostile filesystem.

Every case runs the real console script in a fresh process: a user error is one line on
stderr and a non-zero exit, with nothing left behind; Ctrl-C and ``kill -9`` lose nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from console import Started, assert_one_line_error, cli, start
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import tiny_flags, tiny_settings

from mop_torchrl.babyai.demos import generate_demos, open_demos
from mop_torchrl.cli import build_parser, main
from mop_torchrl.train import TrainConfig
from mop_torchrl.train.checkpoint import load_checkpoint, save_checkpoint
from mop_torchrl.train.policy import build_policy

LEVEL = "GoToRedBall"
TINY_FLAGS = tiny_flags()


def saved_run(run_dir: Path, update: int, **overrides) -> TrainConfig:
    """A run directory as ``Run`` leaves it after ``update`` updates (no training needed)."""
    config = TrainConfig.from_dict(
        tiny_settings(run_dir=str(run_dir.parent), run_name=run_dir.name, **overrides)
    )
    actor, critic = build_policy(config)
    params = {id(p): p for m in (actor, critic) for p in m.parameters()}
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    save_checkpoint(
        run_dir / "checkpoint.pt",
        {
            "config": config.to_dict(),
            "model": {"actor": actor.state_dict(), "critic": critic.state_dict()},
            "optimizer": torch.optim.Adam(params.values()).state_dict(),
            "update": update,
            "frames": 0,
            "extra": {},
        },
    )
    return config


@pytest.mark.subprocess
@pytest.mark.slow
def test_bad_config_files_and_values(tmp_path):
    bad_yaml, infinite = tmp_path / "bad.yaml", tmp_path / "inf.yaml"
    bad_yaml.write_text("num_envs: [1\n")
    runs = tmp_path / "runs"
    infinite.write_text(f"alpha: .inf\nrun_dir: {runs}\n")
    assert_one_line_error(cli("train", "--config", bad_yaml), "not valid YAML (line 2", 2)
    assert_one_line_error(cli("train", "--config", infinite), "'alpha' must be finite", 2)
    result = cli("train", "--task_id", "GoToNowhere", "--run_dir", runs)
    assert_one_line_error(result, "Unknown BabyAI level 'GoToNowhere'")
    assert not runs.exists()


@pytest.mark.subprocess
@pytest.mark.slow
def test_unwritable_output_directories(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = cli("train", *TINY_FLAGS, "--run_dir", blocker / "runs")
    assert_one_line_error(result, "is not a directory")
    result = cli("demos", "--level", LEVEL, "--episodes", 1, "--out", blocker / "demos")
    assert_one_line_error(result, "Not a directory")
    saved_run(tmp_path / "mop", update=1)
    result = cli("routes", "--checkpoint", tmp_path / "mop", "--out", blocker / "routes")
    assert_one_line_error(result, "Not a directory")
    assert blocker.read_text() == "not a directory"


@pytest.mark.subprocess
@pytest.mark.slow
def test_existing_run_name_is_refused_unless_overwrite(tmp_path):
    logs_only = tmp_path / "logs_only"
    (logs_only / "logs" / "scalars").mkdir(parents=True)
    (logs_only / "config.yaml").write_text("seed: 3\n")
    result = cli("train", *TINY_FLAGS, "--run_dir", tmp_path, "--run_name", "logs_only")
    assert_one_line_error(result, "already holds files of another run: pass --resume")
    assert (logs_only / "config.yaml").read_text() == "seed: 3\n"  # not rewritten
    saved_run(tmp_path / "done", update=3)
    result = cli("train", *TINY_FLAGS, "--run_dir", tmp_path, "--run_name", "done")
    assert_one_line_error(result, "already holds a checkpoint")
    result = cli(
        "train", *TINY_FLAGS, "--num_updates=1", "--run_dir", tmp_path, "--run_name", "logs_only",
        "--overwrite",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(logs_only)["update"] == 1
    assert yaml.safe_load((logs_only / "config.yaml").read_text())["seed"] == 0


@pytest.mark.subprocess
def test_resume_below_reached_update_is_refused_and_config_kept(tmp_path):
    run_dir = tmp_path / "run"
    saved_run(run_dir, update=12, num_updates=12)
    before = (run_dir / "config.yaml").read_text()
    result = cli("train", "--resume", run_dir, "--num_updates", 5)
    assert_one_line_error(result, "already at update 12: num_updates 5 would go back")
    assert (run_dir / "config.yaml").read_text() == before


@pytest.mark.subprocess
@pytest.mark.slow
def test_bc_with_unusable_demos(tmp_path):
    demos = tmp_path / "demos"
    generate_demos("GoToLocal", 2, demos, num_workers=1, progress=False)
    empty, truncated = tmp_path / "empty", tmp_path / "truncated"
    empty.mkdir()
    generate_demos(LEVEL, 2, truncated, num_workers=1, progress=False)
    image = next(truncated.glob("storage-*")) / "image.memmap"
    os.truncate(image, 1000)
    runs = tmp_path / "runs"
    cases = [
        (tmp_path / "missing", "is not a demo directory"),
        (empty, "is not a demo directory"),
        (truncated, "image.memmap has 1000 bytes"),
        (demos, "are of BabyAI-GoToLocal-v0, not BabyAI-GoToRedBall-v0"),
    ]
    for path, message in cases:
        result = cli("train", *TINY_FLAGS, "--algo=bc", "--demos", path, "--run_dir", runs)
        assert_one_line_error(result, message)
    assert not runs.exists()
    assert image.stat().st_size == 1000  # never regrown


@pytest.mark.subprocess
@pytest.mark.slow
def test_checkpoint_misuse(tmp_path):
    gru = tmp_path / "gru"
    saved_run(gru, update=1, policy="gru")
    result = cli("eval", "--checkpoint", gru, "--threshold", 0.2)
    assert_one_line_error(result, "holds a 'gru' policy: --threshold/--disable_largest apply")
    for episodes in (0, -3):
        result = cli("eval", "--checkpoint", gru, "--episodes", episodes)
        assert_one_line_error(result, "--episodes: expected an integer >= 1", 2)
    runs = tmp_path / "runs"
    result = cli(
        "train", *TINY_FLAGS, "--algo=ppo", "--minibatches=2", "--init_checkpoint",
        gru / "checkpoint.pt", "--run_dir", runs,
    )  # fmt: skip
    assert_one_line_error(result, "(policy 'gru') does not fit this actor: ")
    assert "missing weights" in result.stderr and "unexpected weights" in result.stderr
    assert not runs.exists()
    result = cli("routes", "--checkpoint", gru, "--out", tmp_path / "routes", "--episodes", 1)
    assert_one_line_error(result, "MoP", 2)
    assert not (tmp_path / "routes").exists()


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


@pytest.mark.subprocess
def test_untrusted_checkpoint_cannot_run_code(tmp_path):
    _Exploit.marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "mop_torchrl.checkpoint/1", "payload": _Exploit()}, path)
    result = cli("eval", "--checkpoint", path)
    assert_one_line_error(result, "not data-only")
    assert not _Exploit.marker.exists()


def _wait_for_rows(path: Path, rows: int, proc: Started, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.exists() and len(path.read_text().splitlines()) >= rows:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{path} never reached {rows} rows")


def _logged_steps(run_dir: Path) -> list[int]:
    text = (run_dir / "logs" / "scalars" / "train" / "loss.csv").read_text()
    return [int(line.split(",")[0]) for line in text.splitlines()]


@pytest.mark.subprocess
@pytest.mark.slow
def test_sigint_saves_the_current_update_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", *TINY_FLAGS, "--num_updates=200", "--checkpoint_interval=100"]
    proc = start(*args, "--run_dir", tmp_path, "--run_name", "run", stdout=True)
    _wait_for_rows(run_dir / "logs" / "scalars" / "train" / "loss.csv", 2, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1].split("\r")[-1]
    update = load_checkpoint(run_dir)["update"]
    assert last == (
        f"mop-torchrl train: interrupted: checkpoint saved at update {update}; continue with "
        f"--resume {run_dir}"
    )
    assert 2 <= update < 100 and _logged_steps(run_dir) == list(range(1, update + 1))


@pytest.mark.subprocess
@pytest.mark.slow
def test_killed_run_resumes_with_each_update_logged_once(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", *TINY_FLAGS, "--num_updates=14", "--checkpoint_interval=6"]
    proc = start(*args, "--run_dir", tmp_path, "--run_name", "run", stderr=False)
    _wait_for_rows(run_dir / "logs" / "scalars" / "train" / "loss.csv", 7, proc)
    proc.send_signal(signal.SIGKILL)  # after the checkpoint of update 6, well before 12
    proc.wait()
    logged, saved = _logged_steps(run_dir), load_checkpoint(run_dir)["update"]
    assert saved < len(logged)  # updates logged after the last checkpoint ...
    orphan = run_dir / ".checkpoint.pt.abc123.tmp"  # ... and a kill during a write
    orphan.write_bytes(b"partial")
    result = cli("train", "--resume", run_dir)
    assert result.returncode == 0, result.stderr
    assert _logged_steps(run_dir) == list(range(1, 15))  # ... are logged once
    assert not orphan.exists()


@pytest.mark.subprocess
@pytest.mark.slow
def test_resume_in_a_fresh_process_is_bit_exact(tmp_path):
    """12 straight updates equal 6 + ``--resume`` to 12 in another process (dropout on)."""
    from mop_torchrl.train import train

    kwargs = tiny_settings(unroll_len=4, checkpoint_interval=3, run_dir=str(tmp_path))
    assert TrainConfig.from_dict(kwargs).mop.dropout_beta > 0  # the default: expert dropout on
    straight = train(TrainConfig.from_dict({**kwargs, "num_updates": 12, "run_name": "straight"}))
    half = train(TrainConfig.from_dict({**kwargs, "num_updates": 6, "run_name": "half"}))
    result = cli("train", "--resume", half, "--num_updates", 12)
    assert result.returncode == 0, result.stderr
    a, b = load_checkpoint(straight), load_checkpoint(half)
    assert a["update"] == b["update"] == 12
    assert a["extra"]["episodes"] == b["extra"]["episodes"] > 0  # the count goes on
    for name, value in a["model"]["actor"].items():
        assert torch.equal(b["model"]["actor"][name], value), name


@pytest.mark.subprocess
@pytest.mark.slow
def test_demos_append_grows_past_the_first_capacity(tmp_path):
    out = tmp_path / "demos"
    for episodes in (20, 250):  # the first run allocates 1024 rows; the second needs more
        result = cli("demos", "--level", LEVEL, "--episodes", episodes, "--out", out, "--quiet")
        assert result.returncode == 0, result.stderr
    buffer, meta = open_demos(out)
    assert meta["episodes"] == 270 and meta["frames"] > 1024 and meta["capacity"] > 1024
    rows = buffer.storage[: len(buffer)]
    assert torch.equal(rows["episode"].unique(), torch.arange(270))
    assert int(rows["is_init"].sum()) == 270 == int(rows["next", "done"].sum())


# ------------------------------------------------------------------------ fuzz (in process)
_POSITIVE = ["num_envs", "unroll_len", "num_updates", "lr", "log_interval", "batch_slices"]
_bad_flag = st.one_of(
    st.tuples(st.sampled_from(_POSITIVE), st.integers(-(10**6), 0).map(str)),
    st.tuples(st.sampled_from(["alpha", "lr", "gamma"]), st.sampled_from(["inf", "-inf", "nan"])),
    st.tuples(st.sampled_from(["num_envs", "seed", "lr"]), st.text(min_size=1).filter(
        lambda s: not _is_number(s)
    )),
    st.tuples(
        st.sampled_from(["mop_layers", "mop.layers"]),
        st.text(max_size=10).filter(lambda s: not _parses(s)),
    ),
    st.tuples(
        st.sampled_from(["mop.router_dim", "instr_dim", "encoder.word_dim"]),
        st.sampled_from(["0", "-1", "2.5", "inf", "x"]),
    ),
    st.tuples(st.just("mop.dropout_beta"), st.sampled_from(["-1", "2.5", "inf", "x"])),  # 0: off
    st.tuples(st.sampled_from(["policy", "algo", "backend"]), st.text(max_size=8)),
    st.tuples(st.just("task_id"), st.text(min_size=1, max_size=20)),
)  # fmt: skip


def _parses(text: str) -> bool:
    from mop_torchrl.core.config import parse_layers

    try:
        parse_layers(text)
    except ValueError:
        return False
    return True


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the suite is deterministic: the same examples on every run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    bad=_bad_flag,
    yaml_text=st.one_of(st.none(), st.text(max_size=40)),
    good=st.dictionaries(st.sampled_from(["seed", "num_envs"]), st.integers(1, 4), max_size=2),
)
def test_fuzz_invalid_train_input_fails_cleanly(tmp_path, bad, yaml_text, good):
    """Random invalid flags (and YAML text): a usage error, one line, no run directory."""
    key, value = bad
    if key == "task_id":
        from mop_torchrl.babyai.levels import resolve_level

        with contextlib.suppress(ValueError):
            resolve_level(value)
            return  # happens to be a real level
    if key in ("policy", "algo", "backend") and value in (
        "mop",
        "gru",
        "imitation",
        "bc",
        "ppo",
        "inprocess",
        "multiprocess",
        "distributed",
        "ray",
    ):
        return  # fmt: skip
    runs = tmp_path / "fuzz_runs"
    argv = ["train", *[f"--{k}={v}" for k, v in good.items()], f"--{key}={value}"]
    argv += ["--run_dir", str(runs), "--eval_episodes=0"]
    if yaml_text is not None:
        config = tmp_path / "fuzz.yaml"
        config.write_text("bogus_key: 1\n" + yaml_text)  # never a valid config
        argv += ["--config", str(config)]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
        main(argv)  # any other exception escapes and fails the test with its traceback
    assert exit_info.value.code not in (0, None)
    lines = stderr.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mop-torchrl train: "), lines
    assert not runs.exists()


@pytest.mark.subprocess
@pytest.mark.slow
def test_multilevel_eval_and_bad_level_as_the_console_script_prints_them(tmp_path):
    """``mop-torchrl eval`` on a multi-level checkpoint reports every level by default; a
    misspelt level in a list is one line naming the near match."""
    levels = "GoToRedBall,GoToLocal"
    saved_run(tmp_path / "multi", 0, task_id=levels)
    result = cli(
        "eval",
        "--checkpoint",
        tmp_path / "multi",
        "--episodes",
        1,
        "--num_envs",
        1,
        "--probe_episodes",
        1,
    )
    assert result.returncode == 0, result.stderr
    printed = [line.split(":")[0].strip() for line in result.stdout.splitlines()]
    assert "GoToRedBall" in printed and "GoToLocal" in printed, result.stdout
    bad = cli("train", "--task_id", "GoToRedBall,GoToLocl", "--run_dir", tmp_path, *TINY_FLAGS)
    assert_one_line_error(bad, "GoToLocal")


def test_one_spelling_with_the_old_ones_still_accepted():
    """Flags are spelt with underscores and the level is ``--task_id`` in every command; the
    earlier spellings parse to the same arguments without being listed in ``--help``."""
    parser = build_parser()
    common = ["--checkpoint", "c", "--out", "o"]
    new = parser.parse_args(
        ["routes", *common, "--task_id", "GoToLocal", "--disable_largest", "--sweep_thresholds",
         "0,0.1", "--sweep_episodes", "2", "--plot_episodes", "1"]
    )  # fmt: skip
    old = parser.parse_args(
        ["routes", *common, "--level", "GoToLocal", "--disable-largest", "--sweep-thresholds",
         "0,0.1", "--sweep-episodes", "2", "--plot-episodes", "1"]
    )  # fmt: skip
    assert (
        vars(new) == vars(old) and new.task_id == "GoToLocal" and new.sweep_thresholds == (0, 0.1)
    )
    evaluate = ["eval", "--checkpoint", "c"]
    assert parser.parse_args([*evaluate, "--disable-largest"]).disable_largest
    assert parser.parse_args([*evaluate, "--disable_largest"]).disable_largest
    assert not parser.parse_args(evaluate).disable_largest
    demos = ["demos", "--episodes", "1", "--out", "o"]
    assert parser.parse_args([*demos, "--level", "GoToLocal"]).task_id == "GoToLocal"
    assert parser.parse_args([*demos, "--task_id", "GoToLocal"]).task_id == "GoToLocal"
    for command in ("eval", "routes", "demos", "train"):
        text = parser._subparsers._group_actions[0].choices[command].format_help()
        flags = [flag.strip("[],") for flag in text.split() if flag.startswith(("--", "[--"))]
        assert "--task_id" in flags and "--level" not in flags
        assert not [flag for flag in flags if "-" in flag[2:]], command
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        main(["demos", "--episodes", "1", "--out", "o"])
    assert "required: --task_id" in err.getvalue()


def test_bench_flags_one_spelling():
    from mop_torchrl import bench

    text = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stdout(text):
        bench.main(["--help"])
    flags = [
        flag.strip("[],") for flag in text.getvalue().split() if flag.startswith(("--", "[--"))
    ]
    assert "--num_envs" in flags and "--task_id" in flags and "--mop_preset" in flags
    assert not [flag for flag in flags if "-" in flag.lstrip("[-")]
