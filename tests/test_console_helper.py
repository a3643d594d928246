"""``tests/console.py``'s ``cli`` (a child forked from a warm interpreter) prints, exits and
leaves files exactly as the console script started as a fresh process does."""

from __future__ import annotations

import subprocess

import pytest
from console import QUIET, SCRIPT, cli
from tiny import tiny_flags


def fresh(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=900, env=env
    )


def same(a: subprocess.CompletedProcess, b: subprocess.CompletedProcess) -> None:
    assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)


@pytest.mark.subprocess
def test_forked_and_fresh_console_script_agree(tmp_path, monkeypatch):
    # a usage error (stderr, exit 2) and --help (stdout, exit 0), in both environments
    same(cli("train", "--seed=-1"), fresh("train", "--seed=-1"))
    same(cli("train", "--help", env=QUIET), fresh("train", "--help", env=QUIET))
    # an error after a run folder is opened (exit 1), from another working directory
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    args = ["train", *tiny_flags(), "--run_dir", "file/runs"]
    warm, cold = cli(*args), fresh(*args)
    same(warm, cold)
    assert warm.returncode == 1 and "is not a directory" in warm.stderr
