"""The ``mop-torchrl`` console script as a user runs it, for the tests that check what it prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = str(Path(sys.executable).parent / "mop-torchrl")
QUIET = {**os.environ, "TQDM_DISABLE": "1"}
"""An environment without the progress bar: stderr then holds only what the run prints."""


def cli(*args: object, timeout: float = 900, **kwargs: Any) -> subprocess.CompletedProcess:
    """Runs ``mop-torchrl *args`` to the end, capturing its output as text."""
    return subprocess.run(
        [SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def assert_one_line_error(result: subprocess.CompletedProcess, match: str, code: int = 1) -> str:
    """The run failed with ``code`` and one stderr line ``mop-torchrl ...`` holding ``match``."""
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    assert lines[0].startswith("mop-torchrl ") and match in lines[0], lines[0]
    return lines[0]
