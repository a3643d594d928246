"""Each example script runs end to end for a few updates."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize(
    "script, args",
    [
        ("collector_replay.py", ["--frames", "256"]),
        ("imitation.py", ["--num_envs", "4", "--unroll_len", "8", "--num_updates", "2"]),
        ("ppo.py", ["--num_envs", "4", "--unroll_len", "8", "--num_updates", "2"]),
    ],
)
def test_example_runs(script, args):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
