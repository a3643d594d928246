"""Atomic file writes, shared by the checkpoints and the demo metadata.

A file is written to a temporary file in the same directory, flushed and fsync'ed, renamed over
the target with :func:`os.replace` (atomic on POSIX) and the directory fsync'ed, so a process
killed at any moment leaves either the old file or the new one, never a torn one. A kill
before the rename can leave the temporary file (``.{name}.<random>.tmp``) behind:
:func:`remove_orphan_temps` removes those of one target.

This module is the package's base: it imports nothing from ``mop_torchrl``.

Examples:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from mop_torchrl.io import atomic_write_text
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = atomic_write_text(Path(tmp) / "a.json", '{"x": 1}')
    ...     path.read_text(), sorted(p.name for p in Path(tmp).iterdir())
    ('{"x": 1}', ['a.json'])
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "remove_orphan_temps"]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Replaces ``path`` atomically with what ``write`` writes to the binary file it is given.

    The parent directory is created if missing. If ``write`` raises (or the process is
    interrupted), ``path`` is left as it was and the temporary file is removed.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replaces ``path`` atomically with ``data`` (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Replaces ``path`` atomically with ``text`` encoded as UTF-8 (:func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode())


def remove_orphan_temps(path: str | os.PathLike) -> list[Path]:
    """Removes the temporary files that kills during :func:`atomic_write` left beside ``path``.

    Only call it while no other process writes ``path`` (a live writer's temporary file
    looks the same).
    """
    path = Path(path)
    orphans = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    return orphans


def _fsync_dir(directory: Path) -> None:
    """Makes the rename durable; some filesystems cannot open a directory: best effort."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
