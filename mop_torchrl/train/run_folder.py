"""The run folder: where a run lives, what may start in it, its lock, and room for its saves.

Everything a run checks before it touches the disk (:func:`validate_start`: the config's inputs,
the folder's state, a resumed checkpoint and its buffer dumps), what ``--overwrite`` may delete
(:func:`check_deletable`), the lock that keeps a second process out (:class:`RunLock`) and the
free-space check before a save.
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from tensordict import TensorDictBase

from mop_torchrl.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    verify_dump,
)
from mop_torchrl.train.config import RESUMABLE_CHANGES, TrainConfig
from mop_torchrl.train.logs import LOGGER_PACKAGES
from mop_torchrl.train.policy import build_policy, load_modules

__all__ = [
    "CHECKPOINT",
    "DiskFullError",
    "RunError",
    "RunLock",
    "check_deletable",
    "check_free_space",
    "disk_bytes",
    "no_space_cause",
    "remove_run",
    "run_directory",
    "stored_tensors",
    "validate_start",
]

CHECKPOINT = "checkpoint.pt"


_RUN_PLACE = frozenset({"run_dir", "run_name"})
"""Where the run lives, set from ``--resume RUN_DIR``: a moved run folder still resumes."""


_DUMP_NAME = re.compile(r"buffers/[A-Za-z0-9_-]+")


class RunError(ValueError):
    """A run that cannot start as asked (name taken, in use, nothing to resume, unusable
    inputs)."""


class DiskFullError(OSError):
    """A checkpoint or buffer dump that did not fit on the disk; the last pair was kept."""


def run_directory(config: TrainConfig) -> Path:
    """The directory of the run ``config`` describes: ``run_dir/name``."""
    return Path(config.run_dir) / config.name


def validate_start(
    config: TrainConfig, resume: bool, overwrite: bool = False
) -> dict[str, Any] | None:
    """Checks that the run can start, without touching the disk; returns the checkpoint to resume.

    Checked: the level exists; BC demos open and hold that level; an ``init_checkpoint`` loads
    into this policy; the logger's package is installed; the run directory is writable; a new
    run does not reuse a directory (unless ``overwrite``, and then only a run directory of
    this package inside ``run_dir``: :func:`check_deletable`); a resumed run's checkpoint is
    readable, was written with the same settings, is not past ``num_updates``, and the
    buffer dumps it names match the sizes and sha256 it recorded (a run directory with logs
    or buffers but no checkpoint is not resumed from 0: it is refused).

    Raises:
        RunError, CheckpointError, DemoError, ValueError: naming what is wrong (one line).
    """
    from mop_torchrl.babyai.levels import parse_level_weights, resolve_level, resolve_levels

    try:
        levels = resolve_levels(config.task_id)
        parse_level_weights(config.level_weights, len(levels))
    except ValueError as err:
        raise RunError(f"config key 'task_id'/'level_weights': {err}") from None
    level = ",".join(levels)
    if config.algo == "bc":
        from mop_torchrl.babyai.demos import DemoError, open_demos

        _, meta = open_demos(config.demos)
        if resolve_level(meta["level"]) != level:
            raise DemoError(f"demos in {config.demos!r} are of {meta['level']}, not {level}")
    run_dir = run_directory(config)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"run directory {str(run_dir)!r} exists and is not a directory")
    _check_writable(run_dir)
    RunLock.check_free(run_dir)
    _check_logger(config.logger)
    checkpoint = run_dir / CHECKPOINT
    payload = None
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other")
    if resume and checkpoint.exists():
        payload = load_checkpoint(checkpoint)
        # Read as a config (old flat configs; keys added since then: what the run trained with).
        saved = TrainConfig.from_saved(payload["config"]).to_dict()
        diff = {
            key: (saved.get(key), value)
            for key, value in config.to_dict().items()
            if key not in RESUMABLE_CHANGES | _RUN_PLACE and saved.get(key) != value
        }
        if diff:
            raise CheckpointError(
                f"checkpoint {str(checkpoint)!r} was written with other settings "
                f"(saved, now): {diff}"
            )
        if config.num_updates < payload["update"]:
            raise RunError(
                f"run {str(run_dir)!r} is already at update {payload['update']}: "
                f"num_updates {config.num_updates} would go back"
            )
        _check_buffer_dumps(payload, run_dir, checkpoint)
    elif resume:
        held = [f"{name}/" for name in ("logs", "buffers") if (run_dir / name).exists()]
        if held:
            raise RunError(
                f"cannot resume {str(run_dir)!r}: {CHECKPOINT} is missing, but it holds "
                f"{' and '.join(held)} of an earlier start; start it over with `mop-torchrl "
                f"train --config {run_dir / 'config.yaml'} --overwrite`"
            )
    elif not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            held = "a checkpoint" if checkpoint.exists() else "files of another run"
            raise RunError(
                f"run directory {str(run_dir)!r} already holds {held}: pass --resume to "
                "continue it, --overwrite to start again, or choose another --run_name"
            )
        check_deletable(config)
        _check_writable(run_dir.parent)
    if config.init_checkpoint and payload is None:
        actor, _ = build_policy(config)
        source = Path(config.init_checkpoint)
        try:
            load_modules(load_checkpoint(source), {"actor": actor}, source)
        except CheckpointError as err:
            raise CheckpointError(f"--init_checkpoint: {err}") from None
    return payload


def remove_run(config: TrainConfig) -> None:
    """Deletes the run directory ``config`` names (``--overwrite``; validate it first).

    Refuses (:func:`check_deletable`) anything but a run directory of this package inside
    ``run_dir``.
    """
    check_deletable(config)
    shutil.rmtree(run_directory(config), ignore_errors=False)


def check_deletable(config: TrainConfig) -> None:
    """Raises :class:`RunError` unless ``--overwrite`` may delete the run directory ``config``
    names: a real directory (not a symbolic link) strictly inside ``run_dir``, holding neither
    the working directory nor the new run's demos or init checkpoint, and a run of this
    package: a ``config.yaml`` that reads as a :class:`TrainConfig`, with a ``checkpoint.pt``,
    ``logs/`` or ``buffers/`` beside it."""
    run_dir = run_directory(config)
    refuse = f"--overwrite refuses to delete {str(run_dir)!r}"
    if run_dir.is_symlink():
        raise RunError(f"{refuse}: it is a symbolic link")
    target, parent = run_dir.resolve(), Path(config.run_dir).resolve()
    if parent not in target.parents:
        raise RunError(f"{refuse}: it is not inside run_dir {config.run_dir!r}")
    inputs = {"the working directory": Path.cwd(), "--demos": config.demos}
    inputs["--init_checkpoint"] = config.init_checkpoint
    for what, path in inputs.items():
        resolved = Path(path).resolve() if path is not None else None
        if resolved is not None and (resolved == target or target in resolved.parents):
            raise RunError(f"{refuse}: it holds {what}")
    config_file = run_dir / "config.yaml"
    try:
        TrainConfig.from_dict(yaml.safe_load(config_file.read_text()) or {})
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError, TypeError):
        raise RunError(
            f"{refuse}: it is not a run directory (no config.yaml of a mop_torchrl run)"
        ) from None
    if not any((run_dir / name).exists() for name in (CHECKPOINT, "logs", "buffers")):
        raise RunError(f"{refuse}: it is not a run directory (no {CHECKPOINT}, logs/ or buffers/)")


def _check_buffer_dumps(payload: dict[str, Any], run_dir: Path, checkpoint: Path) -> None:
    """Checks each buffer dump ``payload`` names against the sizes and sha256 it recorded.

    A checkpoint written before dumps had digests has only the dump's layout checked
    (sizes against its own ``meta.json``), with a warning; pickles in a dump are never read.
    """
    from mop_torchrl.train.dagger import DumpError, check_dump

    recorded = payload.get("buffer_files")
    for name, relative in payload.get("buffers", {}).items():
        if not isinstance(relative, str) or not _DUMP_NAME.fullmatch(relative):
            raise CheckpointError(
                f"checkpoint {str(checkpoint)!r} names the {name} buffer dump {relative!r}, "
                "not a directory under buffers/"
            )
        path = run_dir / relative
        if recorded is not None:
            if name not in recorded:
                raise CheckpointError(
                    f"checkpoint {str(checkpoint)!r} records no files of its {name} buffer dump"
                )
            verify_dump(path, recorded[name], checkpoint)
            continue
        if not path.is_dir():
            raise CheckpointError(
                f"checkpoint {str(checkpoint)!r} names the {name} buffer {str(path)!r}, "
                "which is missing"
            )
        try:
            check_dump(path)
        except DumpError as err:
            raise CheckpointError(str(err)) from None
        logging.getLogger(__name__).warning(
            f"warning: checkpoint {str(checkpoint)!r} predates buffer-dump digests: the "
            f"{name} dump was checked for its layout only (the next checkpoint records them)"
        )


def _check_logger(kind: str) -> None:
    package = LOGGER_PACKAGES.get(kind)
    if package is not None and importlib.util.find_spec(package) is None:
        raise RunError(f"--logger {kind} needs the {package!r} package: pip install {package}")


def _check_writable(path: Path) -> None:
    """Raises :class:`RunError` unless ``path`` (or its nearest existing parent) takes files."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise RunError(f"cannot create {str(path)!r}: {str(probe)!r} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise RunError(f"cannot write in {str(probe)!r}: {err.strerror or err}") from None


class RunLock:
    """An exclusive lock on a run directory, held by this process while it runs there.

    ``fcntl.flock`` on the directory itself (no lock file is created): the operating system
    drops it when the process ends in any way, ``kill -9`` included, so a stale lock cannot
    outlive its run. A run directory of this process taken again (a test's second run in one
    interpreter) passes the lock on to the new holder.
    """

    _held: ClassVar[dict[str, RunLock]] = {}

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def take(cls, path: Path) -> RunLock:
        """Locks ``path`` (an existing directory).

        Raises:
            RunError: if another process holds it.
        """
        key = os.path.realpath(path)
        if (mine := cls._held.get(key)) is not None:
            mine.release()
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise RunError(
                f"run directory {str(path)!r} is in use by another process (a run of it is "
                "still going): wait for it to end or stop it first"
            ) from None
        cls._held[key] = lock = cls(path, fd)
        return lock

    @classmethod
    def check_free(cls, path: Path) -> None:
        """Raises :class:`RunError` if another process holds ``path``'s lock (not taking it)."""
        if path.is_dir() and os.path.realpath(path) not in cls._held:
            cls.take(path).release()

    def release(self) -> None:
        """Releases the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            key = os.path.realpath(self.path)
            if self._held.get(key) is self:
                del self._held[key]

    @classmethod
    def _drop_in_child(cls) -> None:
        """In a forked child (a collector worker), closes the inherited descriptors: the lock
        stays the parent's alone, so it ends with the run even if a worker outlives it."""
        for lock in cls._held.values():
            if lock._fd is not None:
                os.close(lock._fd)
                lock._fd = None
        cls._held.clear()


os.register_at_fork(after_in_child=RunLock._drop_in_child)


def check_free_space(directory: Path, needed: int) -> None:
    """Raises ``OSError(ENOSPC)`` unless ``directory``'s filesystem has ``needed`` bytes free
    for this user."""
    stats = os.statvfs(directory)
    free = stats.f_bavail * stats.f_frsize
    if free < needed:
        raise _SpaceShortage(errno.ENOSPC, f"{_mib(needed)} needed, {_mib(free)} free")


class _SpaceShortage(OSError):
    """The free-space check before a save (nothing was written)."""


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def no_space_cause(err: BaseException) -> str:
    """What ran out of space, if ``err`` (or an exception it wraps: torch's ``RuntimeError``
    around a failed write) is a full disk (``ENOSPC``, ``EDQUOT``); else ``""``."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            if isinstance(seen, _SpaceShortage):
                return seen.strerror
            return f"writing {seen.filename!r}" if seen.filename else "while writing"
        if isinstance(seen, RuntimeError) and "No space left on device" in str(seen):
            return "while writing"
        seen = seen.__cause__ or seen.__context__
    return ""


def stored_tensors(buffer: Any) -> list[torch.Tensor]:
    """The tensors a tracked buffer's dump writes: its (TorchRL) storage's, whole capacity."""
    replay = getattr(buffer, "buffer", buffer)  # DaggerDataset holds a replay buffer
    stored = getattr(getattr(replay, "storage", None), "_storage", None)
    if isinstance(stored, TensorDictBase):
        return list(stored.values(include_nested=True, leaves_only=True))
    return [stored] if isinstance(stored, torch.Tensor) else []


def disk_bytes(tensor: torch.Tensor, page: int = 4096) -> int:
    """``tensor``'s bytes on disk as one file, rounded up to whole pages."""
    return -(-tensor.numel() * tensor.element_size() // page) * page + page
