"""Ctrl-C and SIGTERM as a terminal and a scheduler send them: to the whole process group.

Each case starts the real console script in its own session (``start_new_session``), waits
until it has trained a few updates, signals the process group with ``os.killpg`` and checks
what a user sees: exit code 130 (SIGINT) or 143 (SIGTERM), one line on stderr, a checkpoint of
the update reached (later than any periodic one) with its buffer dump, and no process of the
session left (collector, env and Ray workers); then ``--resume`` continues from it.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from console import QUIET, Started, cli, start
from tiny import tiny_flags

from mop_torchrl.train.checkpoint import load_checkpoint

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

BACKENDS = {
    "inprocess": [],
    "parallel": ["--env_batching=parallel"],
    "multiprocess": ["--backend=multiprocess", "--num_workers=2"],
    "distributed": ["--backend=distributed", "--num_workers=2"],
    "ray": ["--backend=ray", "--num_workers=2"],
}
CLUSTER = pytest.mark.cluster  # one at a time (tests/conftest.py)
MESSAGES = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)"}


def session_processes(sid: int) -> list[str]:
    """The live (non-zombie) processes of session ``sid``, from ``/proc``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] not in "ZX":
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry}: {command[:120]}")
    return found


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "logs" / "scalars" / "train" / "loss.csv"
    if not path.exists():
        return []
    return [int(line.split(",")[0]) for line in path.read_text().splitlines()]


def start_run(run_dir: Path, *flags: str) -> Started:
    """The console script training in its own session (its pid is the process group's id)."""
    args = [*tiny_flags(), "--num_updates=400", "--checkpoint_interval=100", *flags]
    return start(
        "train", *args, "--run_dir", run_dir.parent, "--run_name", run_dir.name,
        env=QUIET, new_session=True,
    )  # fmt: skip


def wait_for_updates(run_dir: Path, proc: Started, updates: int, timeout=300) -> None:
    deadline = time.monotonic() + timeout
    while len(logged_steps(run_dir)) < updates:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {updates} updates in {timeout} s"
        time.sleep(0.1)


def end_session(proc: Started, timeout: float = 120) -> tuple[str, list[str]]:
    """Waits for the script, then for its session to empty; returns (stderr, leftovers), and
    kills any leftover so that a failing test leaves nothing running."""
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
    deadline = time.monotonic() + 10
    while (left := session_processes(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    return stderr, left


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize(
    "backend",
    [pytest.param(b, marks=CLUSTER) if b in ("distributed", "ray") else b for b in BACKENDS],
)
def test_signal_to_the_process_group_saves_and_exits(tmp_path, backend, sig):
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed")
    run_dir = tmp_path / "run"
    proc = start_run(run_dir, *BACKENDS[backend])
    wait_for_updates(run_dir, proc, 3)
    reached = len(logged_steps(run_dir))
    os.killpg(proc.pid, sig)  # what a terminal's Ctrl-C / a scheduler's SIGTERM does
    stderr, left = end_session(proc)

    assert proc.returncode == 128 + sig, (proc.returncode, stderr)
    update = load_checkpoint(run_dir)["update"]
    lines = stderr.strip().splitlines()
    if backend == "ray":  # Ray's own start-up notice (before any signal), not ours to silence
        lines = [line for line in lines if "authentication_token_setup.py" not in line]
    assert lines == [
        f"mop-torchrl train: {MESSAGES[sig]}: checkpoint saved at update {update}; continue "
        f"with --resume {run_dir}"
    ], stderr
    assert not left, left
    # The update reached when the signal came (or the next), not a periodic checkpoint's.
    assert reached <= update < 100 and logged_steps(run_dir) == list(range(1, update + 1))
    payload = load_checkpoint(run_dir)
    assert payload["buffers"] == {"dagger": f"buffers/dagger-{update:08d}"}
    assert [p.name for p in (run_dir / "buffers").iterdir()] == [f"dagger-{update:08d}"]

    if backend in ("inprocess", "multiprocess"):  # the pair resumes (both signals, 2 backends)
        result = cli("train", "--resume", run_dir, f"--num_updates={update + 1}", env=QUIET)
        assert result.returncode == 0, result.stderr
        assert load_checkpoint(run_dir)["update"] == update + 1
        assert logged_steps(run_dir) == list(range(1, update + 2))
