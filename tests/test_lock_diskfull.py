"""A run folder in use is locked; a full disk stops a run with one line and keeps the last pair.

The lock cases run the real console script twice on one run folder; the disk-full cases
use a real full filesystem: a small tmpfs mounted for the test (as root; otherwise the
in-process case simulates ``ENOSPC`` and the console-script case is skipped).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from console import QUIET, cli
from test_signals import end_session, logged_steps, start_run, wait_for_updates
from tiny import tiny_flags

from mop_torchrl.train import TrainConfig
from mop_torchrl.train import run as run_module
from mop_torchrl.train.checkpoint import load_checkpoint, save_checkpoint
from mop_torchrl.train.policy import build_policy
from mop_torchrl.train.run import Run
from mop_torchrl.train.run_folder import DiskFullError, RunError, RunLock


def one_line(result: subprocess.CompletedProcess, match: str, code: int = 1) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1, (result.returncode, result.stderr)
    assert lines[0].startswith("mop-torchrl train: ") and match in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs (``None`` where it cannot be mounted: not root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fills ``disk`` with one file, then gives ``leave`` bytes back."""
    filler = disk / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\1" * 65536)
            f.flush()
    os.truncate(filler, max(filler.stat().st_size - leave, 0))
    return filler


# --------------------------------------------------------------------------- the lock
@pytest.mark.subprocess
@pytest.mark.slow
def test_a_run_folder_in_use_is_refused_and_freed_by_any_exit(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_run(run_dir, "--checkpoint_interval=2")
    try:
        wait_for_updates(run_dir, proc, 3)  # past the checkpoint of update 2
        one_line(cli("train", "--resume", run_dir, env=QUIET), "is in use by another process")
        new = cli(
            "train",
            *tiny_flags(),
            "--overwrite",
            "--run_dir",
            tmp_path,
            "--run_name",
            "run",
            env=QUIET,
        )
        one_line(new, "is in use by another process")
        assert proc.poll() is None and (run_dir / "config.yaml").is_file()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9: the OS drops the lock
        _, left = end_session(proc)
    assert not left, left
    saved = load_checkpoint(run_dir)["update"]
    result = cli("train", "--resume", run_dir, f"--num_updates={saved + 1}", env=QUIET)
    assert result.returncode == 0, result.stderr
    assert logged_steps(run_dir) == list(range(1, saved + 2))


def test_lock_is_per_process_and_released_with_the_loop(tiny_config):
    """Another process (a child here) is refused while a run holds its folder; the loop's end
    releases it; in one interpreter a folder taken again passes the lock on."""
    take = (  # one child, one attempt per line read; a lock taken is kept
        "import sys; from pathlib import Path; from mop_torchrl.train.run_folder import RunLock\n"
        "held = []\n"
        "for line in sys.stdin:\n"
        "    try: held.append(RunLock.take(Path(sys.argv[1])))\n"
        "    except Exception as err: print(type(err).__name__, err, flush=True)\n"
        "    else: print('locked', flush=True)\n"
    )
    run = Run(tiny_config(num_updates=1))
    child = subprocess.Popen(
        [sys.executable, "-c", take, str(run.dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def child_takes() -> str:
        child.stdin.write("take\n")
        child.stdin.flush()
        return child.stdout.readline().strip()

    try:
        held = child_takes()
        assert held.startswith("RunError") and "in use" in held, held
        actor, critic = build_policy(run.config)
        modules = {"actor": actor, "critic": critic}
        with run.updates(modules, torch.optim.Adam(actor.parameters())):
            pass
        assert child_takes() == "locked"  # freed by the loop's end
        with pytest.raises(RunError, match="is in use by another process"):
            RunLock.take(run.dir)
    finally:
        child.kill()
        child.wait()
    RunLock.take(run.dir)
    RunLock.take(run.dir).release()  # taken twice in one process: passed on, then freed


# --------------------------------------------------------------------------- disk full
@pytest.mark.subprocess
@pytest.mark.slow
def test_disk_full_during_a_run_stops_with_one_line_and_keeps_the_pair(small_disk):
    if small_disk is None:
        pytest.skip("cannot mount a tmpfs here (not root): see the in-process case")
    run_dir = small_disk / "run"
    proc = start_run(run_dir, "--checkpoint_interval=3", "--buffer_frames=256")
    while not (run_dir / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    filler = fill(small_disk, leave=64 * 1024)  # room for the logs, not for a checkpoint
    stderr, left = end_session(proc)

    line = stderr.strip().splitlines()
    assert proc.returncode == 1 and len(line) == 1, (proc.returncode, stderr)
    assert "Traceback" not in stderr and "No space left on device" in line[0], line
    kept = load_checkpoint(run_dir)["update"]
    assert f"the checkpoint of update {kept} and its buffers were kept" in line[0], line
    assert [p.name for p in (run_dir / "buffers").iterdir()] == [f"dagger-{kept:08d}"]
    assert not list(run_dir.glob(".checkpoint.pt.*.tmp")) and not left
    filler.unlink()
    result = cli("train", "--resume", run_dir, f"--num_updates={kept + 1}", env=QUIET)
    assert result.returncode == 0, result.stderr  # the kept pair loads (its digests match)
    assert load_checkpoint(run_dir)["update"] == kept + 1


def test_checkpoint_write_on_a_full_disk_names_the_cause(tiny_config, small_disk, monkeypatch):
    """The write itself failing (the free-space estimate bypassed): ``ENOSPC`` as an
    ``OSError``, not torch's ``RuntimeError``; the previous checkpoint stays."""
    if small_disk is None:  # not root: the same failure, simulated

        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "checkpoint.pt")

        monkeypatch.setattr("mop_torchrl.train.checkpoint.atomic_write", no_space)
    config = tiny_config()
    if small_disk is not None:
        config = TrainConfig.from_dict({**config.to_dict(), "run_dir": str(small_disk)})
    run = Run(config)
    actor, critic = build_policy(config)
    modules, optimizer = {"actor": actor, "critic": critic}, torch.optim.Adam(actor.parameters())
    try:
        if small_disk is not None:
            run.save(1, modules, optimizer)
            fill(small_disk)
            with pytest.raises(OSError) as raw:
                save_checkpoint(small_disk / "other.pt", {"model": actor.state_dict()})
            assert raw.value.errno == errno.ENOSPC
            with pytest.raises(DiskFullError, match=r"\d+\.\d MiB needed, 0\.0 MiB free"):
                run.save(2, modules, optimizer)  # the estimate refuses first
        monkeypatch.setattr(run_module, "check_free_space", lambda *args: None)
        with pytest.raises(DiskFullError) as err:
            run.save(2, modules, optimizer)
        message = str(err.value)
        assert "No space left on device" in message and "\n" not in message
        if small_disk is not None:
            assert "the checkpoint of update 1 and its buffers were kept" in message
            assert load_checkpoint(run.dir)["update"] == 1
            assert not list(run.dir.glob(".checkpoint.pt.*.tmp"))
    finally:
        run._lock.release()
