"""The writer of a demo directory: lock, storage growth and the commit protocol.

Commit protocol: complete episodes are written to rows ``[frames, frames + n)`` (past the
committed length) and only then is ``demos.json`` atomically replaced with the new
``frames``/``episodes`` (:func:`~mop_torchrl.babyai.demos.store.write_meta`). A kill at any
moment leaves the previous ``demos.json`` pointing at fully written rows; rows past ``frames``
are ignored by readers and overwritten by the next append. When the storage is full it is
copied into a fresh ``storage-<k+1>`` of about twice the capacity, committed, and the old one
removed (stray ``storage-*`` dirs and metadata temp files from an interrupted run are removed
by the next writer). Data written through ``mmap`` survives a killed process; it is not
fsync'ed against power loss.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import LazyMemmapStorage

from mop_torchrl.babyai.demos.store import (
    FORMAT_VERSION,
    META,
    DemoError,
    key_meta,
    load_rows,
    read_meta,
    write_meta,
)
from mop_torchrl.io import remove_orphan_temps

__all__ = ["DemoWriter"]

_LOCK = "lock"
_COPY_ROWS = 65_536  # rows per copy when the storage grows
_MIN_CAPACITY = 1024


class DemoWriter:
    """Owns a demo directory while generating: lock, storage, growth and the commit protocol.

    Opening takes an exclusive ``flock`` on ``path/lock`` and validates an existing
    directory (same ``level``, intact storage) before anything is written; an existing
    directory without ``demos.json`` must be empty.

    Raises:
        DemoError: another writer holds the lock, the directory holds another level, is
            corrupt, or is not empty and not a demo directory.
    """

    def __init__(self, path: Path, level: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        new_lock = not (path / _LOCK).exists()
        self._lock = open(path / _LOCK, "w")  # noqa: SIM115  (held for the writer's life)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise DemoError(f"another process is writing demos to {path}") from None
        try:
            self._open(path, level)
        except BaseException:  # refused: leave the directory as it was, without our lock file
            if new_lock:  # removed while still held, so no other writer can hold it
                (path / _LOCK).unlink(missing_ok=True)
            self.close()
            raise

    def _open(self, path: Path, level: str) -> None:
        remove_orphan_temps(path / META)  # a kill during a commit; we hold the lock
        if (path / META).exists():
            self.meta = read_meta(path)
            if self.meta["level"] != level:
                self.close()
                raise DemoError(
                    f"{path} holds demos of {self.meta['level']}; cannot append {level}"
                )
            self.rows = load_rows(path, self.meta)  # validated before any write
        else:
            stray = [p.name for p in path.iterdir() if not self._ours(p)]
            if stray:
                self.close()
                raise DemoError(
                    f"{path} is not empty and has no {META}: refusing to write demos there "
                    f"(found {sorted(stray)[:5]})"
                )
            self.meta = {
                "format_version": FORMAT_VERSION,
                "level": level,
                "frames": 0,
                "episodes": 0,
                "capacity": 0,
                "storage": "storage-0",
                "keys": key_meta(),
                "runs": [],
            }
            self.rows = None
        self._remove_stray_storages()

    @staticmethod
    def _ours(p: Path) -> bool:
        return p.name == _LOCK or p.name.startswith("storage-")

    def _remove_stray_storages(self) -> None:
        for p in self.path.glob("storage-*"):
            if p.name != self.meta["storage"] or self.rows is None:
                shutil.rmtree(p, ignore_errors=True)

    def _new_storage(self, capacity: int, template: TensorDictBase) -> None:
        """Copies the committed rows into a fresh storage of ``capacity`` rows and commits it."""
        index = int(self.meta["storage"].split("-")[1]) + (self.rows is not None)
        name = f"storage-{index}"
        sdir = self.path / name
        shutil.rmtree(sdir, ignore_errors=True)
        storage = LazyMemmapStorage(capacity, scratch_dir=sdir, existsok=True)
        storage.set(0, template[0])  # allocates every key's memmap file
        storage.dumps(sdir)
        # Rows are read and written through the memory-mapped TensorDict, by index: the
        # storage's own length counter is not what is committed (and is not reloaded right).
        rows = TensorDict.load_memmap(sdir)
        frames = self.meta["frames"]
        if self.rows is not None:
            for start in range(0, frames, _COPY_ROWS):
                stop = min(start + _COPY_ROWS, frames)
                rows[start:stop] = self.rows[start:stop]
        old = self.path / self.meta["storage"] if self.rows is not None else None
        self.rows = rows
        self.commit(capacity=capacity, storage=name)
        if old is not None and old != sdir:
            shutil.rmtree(old, ignore_errors=True)

    def write(self, episodes: list[TensorDictBase], expected_len: float) -> None:
        """Writes complete episodes after the committed rows, then commits them.

        ``expected_len`` (frames still to come) sizes a storage that must grow, so that a
        run grows it about once.
        """
        rows = torch.cat(episodes)
        first = self.meta["episodes"]
        ids = torch.repeat_interleave(
            torch.arange(first, first + len(episodes)),
            torch.tensor([ep.shape[0] for ep in episodes]),
        )
        rows.set("episode", ids)
        start, n = self.meta["frames"], rows.shape[0]
        if self.rows is None or start + n > self.meta["capacity"]:
            want = max(
                2 * self.meta["capacity"], math.ceil(start + n + expected_len), _MIN_CAPACITY
            )
            self._new_storage(want, rows)
        self.rows[start : start + n] = rows
        self.meta["runs"][-1]["episodes"] += len(episodes)
        self.meta["runs"][-1]["frames"] += n
        self.commit(frames=start + n, episodes=first + len(episodes))

    def commit(self, **updates: Any) -> None:
        """Atomically replaces ``demos.json`` with the current metadata plus ``updates``."""
        meta = {**self.meta, **updates}
        write_meta(self.path / META, meta)
        self.meta = meta

    def close(self) -> None:
        """Releases the lock (idempotent)."""
        with contextlib.suppress(OSError, ValueError):
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
