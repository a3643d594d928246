"""What every training loop uses: run directory, seeding, logging, checkpoints, SIGINT.

The loops themselves (``imitation.py``, ``bc.py``, ``ppo.py``) are written out in each
algorithm's file; :class:`Run` only offers services, and :meth:`Run.updates` the per-update
bookkeeping they share::

    with run.updates(modules, optimizer) as updates:
        for update in updates:                      # start_update .. num_updates - 1
            with updates.phase("collect", update):  # re-seeded from (seed, update), timed
                data = ...
            with updates.phase("train", update):
                ...                                 # store, sample, loss, optimizer step
            updates.end(update, data.numel(), meter, stats)  # log, eval, checkpoint, SIGINT
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.util
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import yaml
from tensordict import TensorDictBase
from torch import nn
from tqdm.auto import tqdm

from mop_torchrl.train.checkpoint import (
    CheckpointError,
    dump_digests,
    load_checkpoint,
    remove_orphan_temps,
    save_checkpoint,
    seed_everything,
    verify_dump,
)
from mop_torchrl.train.config import RESUMABLE_CHANGES, TrainConfig
from mop_torchrl.train.evaluate import bot_episodes, evaluate, grounding_probe
from mop_torchrl.train.logs import LOGGER_PACKAGES, make_logger, truncate_csv_logs
from mop_torchrl.train.policy import build_policy, load_modules
from mop_torchrl.train.stats import EpisodeStats, MetricMeans

__all__ = [
    "NonFiniteLossError",
    "Run",
    "RunError",
    "RunInterrupted",
    "Terminated",
    "Updates",
    "check_finite",
    "validate_start",
]

CHECKPOINT = "checkpoint.pt"
_RUN_PLACE = frozenset({"run_dir", "run_name"})
"""Where the run lives, set from ``--resume RUN_DIR``: a moved run folder still resumes."""
_DUMP_NAME = re.compile(r"buffers/[A-Za-z0-9_-]+")


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss is NaN/inf; the last good checkpoint is left untouched."""


class RunError(ValueError):
    """A run that cannot start as asked (name taken, in use, nothing to resume, unusable
    inputs)."""


class DiskFullError(OSError):
    """A checkpoint or buffer dump that did not fit on the disk; the last pair was kept."""


class RunInterrupted(Exception):
    """Raised by :meth:`Updates.end` after SIGINT or SIGTERM, once a checkpoint of the current
    update is saved; ``exit_code`` is the shell's 128 + signal number (130, 143)."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like ``KeyboardInterrupt`` for SIGINT: outside the loop's deferral, or
    as a second SIGTERM inside it (the console script exits 143)."""


def raise_terminated(signum: int, frame: Any) -> None:
    """A SIGTERM handler raising :class:`Terminated`, so ``finally`` blocks and ``atexit``
    (collector shutdown, ``ray.shutdown``) run instead of the process dying at once."""
    raise Terminated


def check_finite(loss: torch.Tensor, update: int) -> None:
    """Raises :class:`NonFiniteLossError` unless ``loss`` is finite.

    Called before each optimizer step, so a NaN never reaches the weights: this is the one
    value a loop reads back every update (one host sync; metrics wait for the log interval).
    """
    if not bool(torch.isfinite(loss)):
        raise NonFiniteLossError(f"non-finite loss ({loss.item()}) at update {update}")


class Run:
    """A run directory with its resolved config, logger, checkpoints and tracked buffers.

    ``Run(config)`` starts a new run, ``Run(config, resume=True)`` continues the run in
    ``config.run_dir/config.name``. Everything is checked first (:func:`validate_start`), so a
    run that cannot start leaves the disk untouched; then orphan checkpoint temporaries are
    removed, the CSV logs are cut back to the checkpoint's update (each update is logged
    once) and ``config.yaml`` is written.

    The run directory is locked (:class:`RunLock`) from before the checks until the loop
    ends (:meth:`updates`): a second process on it is refused.
    """

    def __init__(self, config: TrainConfig, resume: bool = False) -> None:
        self.config = config
        self.dir = run_directory(config)
        self.checkpoint_path = self.dir / CHECKPOINT
        self._lock = RunLock.take(self.dir) if self.dir.is_dir() else None
        try:
            self._payload = validate_start(config, resume)
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock = self._lock or RunLock.take(self.dir)
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise
        weakref.finalize(self, self._lock.release)
        self.start_update = self._payload["update"] if self._payload else 0
        self.saved_update: int | None = self.start_update if self._payload else None
        remove_orphan_temps(self.checkpoint_path)
        truncate_csv_logs(self.dir / "logs", self.start_update)
        (self.dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        self.logger = make_logger(config.logger, self.dir)
        self.frames = 0
        self.extra: dict[str, Any] = {}
        self.buffers: dict[str, Any] = {}
        self._saved_buffers: dict[str, str] = {}
        self._bar: tqdm | None = None
        self._probe: TensorDictBase | None = None

    # -------------------------------------------------------------- checkpoints
    def restore(self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> None:
        """Loads the run's checkpoint, if any, into ``modules`` and ``optimizer``."""
        payload, self._payload = self._payload, None
        if payload is None:
            return
        load_modules(payload, modules, self.checkpoint_path)
        optimizer.load_state_dict(payload["optimizer"])
        self.frames = payload.get("frames", 0)
        self.extra = payload.get("extra", {})
        self._saved_buffers = payload.get("buffers", {})

    def track(self, name: str, buffer: Any) -> None:
        """Saves ``buffer`` (anything with TorchRL's ``dumps``/``loads``) with every checkpoint.

        On resume it is restored right away from the dump its checkpoint names. Each
        checkpoint names its own dump directory, written before the checkpoint: a run killed
        in between keeps the previous, consistent pair. The checkpoint also records the size
        and sha256 of every file of the dump, checked by :func:`validate_start` before
        anything is read or written.
        """
        self.buffers[name] = buffer
        if name in self._saved_buffers:
            path = self.dir / self._saved_buffers[name]
            if not path.is_dir():
                raise CheckpointError(
                    f"checkpoint {str(self.checkpoint_path)!r} names the {name} buffer "
                    f"{str(path)!r}, which is missing"
                )
            buffer.loads(path)
        elif self.start_update > 0:
            raise CheckpointError(
                f"checkpoint {str(self.checkpoint_path)!r} holds no {name} buffer to resume"
            )

    def save(
        self, update: int, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer
    ) -> Path:
        """Writes the tracked buffers, then the checkpoint after ``update`` updates (atomically).

        Disk full: the free space is checked first against an estimate of what the buffer
        dumps and the checkpoint take (a memory-mapped dump hitting a full filesystem would
        die of SIGBUS), and a write failing for lack of space (``ENOSPC``, also when torch
        wraps it in a ``RuntimeError``) is reported as :class:`DiskFullError`; either way the
        new files are removed and the last checkpoint and its buffer dumps are kept.
        """
        kept = set(self._saved_buffers.values())
        written = {name: f"buffers/{name}-{update:08d}" for name in self.buffers}
        try:
            _check_free_space(self.dir, self._bytes_needed(modules, optimizer))
            path = self._write(update, modules, optimizer)
        except (OSError, RuntimeError) as err:
            if not _no_space(err):
                raise
            for relative in set(written.values()) - kept:
                shutil.rmtree(self.dir / relative, ignore_errors=True)
            last = (
                f"the checkpoint of update {self.saved_update} and its buffers were kept"
                if self.saved_update is not None
                else "no checkpoint was written yet"
            )
            raise DiskFullError(
                f"cannot save update {update} in {str(self.dir)!r}: No space left on device "
                f"({_no_space(err)}); {last}. Free some space, then continue with --resume "
                f"{self.dir}"
            ) from None
        self._saved_buffers = written
        return path

    def _bytes_needed(self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> int:
        """What :meth:`_write` puts on disk, over-estimated: every buffer dump's tensors (each
        file rounded up to a page), the model and optimizer tensors, 256 KiB of metadata."""
        state = [t for m in modules.values() for t in m.state_dict().values()]
        state += [
            t
            for per_param in optimizer.state_dict()["state"].values()
            for t in per_param.values()
            if isinstance(t, torch.Tensor)
        ]
        dumps = [t for buffer in self.buffers.values() for t in _stored_tensors(buffer)]
        return sum(_disk_bytes(t) for t in dumps + state) + 256 * 1024

    def _write(
        self, update: int, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer
    ) -> Path:
        saved = {name: f"buffers/{name}-{update:08d}" for name in self.buffers}
        files = {}
        for name, buffer in self.buffers.items():
            path = self.dir / saved[name]
            if path.exists():
                shutil.rmtree(path)
            path.parent.mkdir(exist_ok=True)
            buffer.dumps(path)
            files[name] = dump_digests(path)
        path = save_checkpoint(
            self.checkpoint_path,
            {
                "config": self.config.to_dict(),
                "model": {name: m.state_dict() for name, m in modules.items()},
                "optimizer": optimizer.state_dict(),
                "update": update,
                "frames": self.frames,
                "extra": self.extra,
                "buffers": saved,
                "buffer_files": files,
            },
        )
        for stale in (self.dir / "buffers").glob("*") if saved else ():
            if str(stale.relative_to(self.dir)) not in saved.values():
                shutil.rmtree(stale)
        self.saved_update = update
        return path

    def held_out(self, actor: nn.Module) -> dict[str, float]:
        """``eval/*`` metrics: greedy success on ``eval_interval_episodes`` held-out episodes and
        the grounding probe on as many bot episodes. It runs after an update and before the
        next re-seeding, so the random numbers it draws do not change the training run."""
        config, start = self.config, time.perf_counter()
        if self._probe is None:
            self._probe = bot_episodes(config.task_id, config.eval_interval_episodes, config.seed)
        result = evaluate(actor, config.task_id, config.eval_interval_episodes, config.seed)
        result.update(grounding_probe(actor, self._probe))
        metrics = {f"eval/{key}": value for key, value in result.items() if key in _EVAL_KEYS}
        for name, per_level in result.get("levels", {}).items():
            for key in ("success_rate", "mean_return", "path_ratio", "routing_cost"):
                metrics[f"eval/{name}/{key}"] = per_level[key]
        metrics["perf/eval_s"] = time.perf_counter() - start
        return metrics

    # -------------------------------------------------------------- logs and the loop
    def log(self, update: int, metrics: dict[str, float]) -> None:
        """Logs the finite numbers of ``metrics`` at ``update`` and shows a few on the bar."""
        for name, value in metrics.items():
            if isinstance(value, float | int) and math.isfinite(value):
                self.logger.log_scalar(name, float(value), step=update)
        if self._bar is not None:
            short = {k.split("/")[-1]: v for k, v in metrics.items() if k in _BAR_KEYS}
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in short.items()}, refresh=False)

    @contextlib.contextmanager
    def updates(
        self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer
    ) -> Iterator[Updates]:
        """The loop's bookkeeping (:class:`Updates`), with a progress bar and SIGINT and
        SIGTERM deferred.

        A first SIGINT or SIGTERM lets the current update finish and be checkpointed, then
        :meth:`Updates.end` raises :class:`RunInterrupted` (exit code 130 or 143); a second
        one raises ``KeyboardInterrupt`` or :class:`Terminated` at once. A
        :class:`NonFiniteLossError` leaving the block gets the checkpoint that was kept added
        to its message. The run directory's lock is released when the block ends.
        """
        config = self.config
        self._bar = tqdm(
            total=config.num_updates,
            initial=self.start_update,
            desc=config.name,
            dynamic_ncols=True,
        )
        try:
            with _deferred_signals() as received:
                yield Updates(self, modules, optimizer, received)
        except NonFiniteLossError as err:
            kept = (
                f"the checkpoint of update {self.saved_update} was kept"
                if self.saved_update is not None
                else "no checkpoint was written yet"
            )
            raise NonFiniteLossError(
                f"{err}: stopping; {kept}. Try a lower --lr or --alpha."
            ) from None
        finally:
            self._bar.close()
            self._bar = None
            self._lock.release()


class Updates:
    """Per-update bookkeeping of a training loop; made by :meth:`Run.updates`.

    Iterating gives the update indices still to do (``start_update`` to ``num_updates - 1``).
    :meth:`phase` re-seeds the global generators from ``(seed, update, phase)`` and times the
    block, so a run resumed in a fresh process repeats an uninterrupted one exactly;
    :meth:`end` counts the update and logs, evaluates and checkpoints at their intervals.
    """

    def __init__(
        self,
        run: Run,
        modules: dict[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        received: Callable[[], int],
    ) -> None:
        self.run, self.modules, self.optimizer = run, modules, optimizer
        self.received = received
        self.seconds = {"collect": 0.0, "train": 0.0}

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.run.start_update, self.run.config.num_updates))

    @contextlib.contextmanager
    def phase(self, name: Literal["collect", "train"], update: int) -> Iterator[None]:
        """Re-seeds from ``(seed, update, name)`` with the run's thread count; times the block.

        The thread count is set again each time: torchrl raises it whenever a batched env
        closes, even at garbage collection long after an evaluation, and an update would
        otherwise run with other threads (other rounding: a resumed run would differ).
        """
        config = self.run.config
        if torch.get_num_threads() != config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        seed_everything(config.seed, update, name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start

    def end(
        self,
        update: int,
        frames: int,
        metrics: MetricMeans,
        stats: EpisodeStats | None = None,
    ) -> None:
        """Closes update ``update`` (0-based) of ``frames`` frames.

        At the log interval it logs the means of ``metrics`` since the last log (their one
        read-back), ``stats``' summary and ``perf/*``; at the eval interval the held-out
        metrics; at the checkpoint interval, the last update or after SIGINT/SIGTERM a
        checkpoint. Raises :class:`RunInterrupted` after SIGINT/SIGTERM.
        """
        run, config = self.run, self.run.config
        done = update + 1
        step_s = self.seconds["collect"] + self.seconds["train"]
        run.frames += frames
        run.extra["wall_s"] = run.extra.get("wall_s", 0.0) + step_s
        if run._bar is not None:
            run._bar.update(1)
        if done % config.log_interval == 0 or done == config.num_updates:
            logged = metrics.pop()
            logged.update(stats.summary() if stats is not None else {})
            logged.update(
                {
                    "perf/frames": run.frames,
                    "perf/wall_s": run.extra["wall_s"],
                    "perf/frames_per_s": frames / step_s,
                    "perf/collect_s": self.seconds["collect"],
                    "perf/train_s": self.seconds["train"],
                }
            )
            run.log(done, logged)
        if config.eval_interval and done % config.eval_interval == 0:
            run.log(done, run.held_out(self.modules["actor"]))
        if done % config.checkpoint_interval == 0 or done == config.num_updates or self.received():
            run.save(done, self.modules, self.optimizer)
        if signum := self.received():
            what = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
            raise RunInterrupted(
                f"{what}: checkpoint saved at update {done}; continue with --resume {run.dir}",
                exit_code=128 + signum,
            )


_EVAL_KEYS = {
    "success_rate",
    "mean_return",
    "path_ratio",
    "routing_cost",
    "label_accuracy",
    "label_accuracy_shuffled",
    "grounding_gap",
}

_BAR_KEYS = {
    "train/loss",
    "train/accuracy",
    "episode/success",
    "episode/return",
    "train/routing_cost",
    "perf/frames_per_s",
}


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
        # Read as a config (old flat configs, keys added since then take their defaults).
        saved = TrainConfig.from_dict(payload["config"]).to_dict()
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
    if config.algo == "ppo" and config.init_checkpoint and payload is None:
        actor, _ = build_policy(config)
        source = Path(config.init_checkpoint)
        load_modules(load_checkpoint(source), {"actor": actor}, source)
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


@contextlib.contextmanager
def _deferred_signals() -> Iterator[Callable[[], int]]:
    """While active, a first SIGINT or SIGTERM only records its number (read with the yielded
    function; 0 until then); a second one raises ``KeyboardInterrupt`` (SIGINT) or
    :class:`Terminated` (SIGTERM) at once. Outside the main thread it does nothing."""
    received = [0]
    if threading.current_thread() is not threading.main_thread():
        yield lambda: received[0]
        return

    def handler(signum: int, frame: Any) -> None:
        if received[0]:
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated
        received[0] = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: received[0]
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)


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


def _check_free_space(directory: Path, needed: int) -> None:
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


def _no_space(err: BaseException) -> str:
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


def _stored_tensors(buffer: Any) -> list[torch.Tensor]:
    """The tensors a tracked buffer's dump writes: its (TorchRL) storage's, whole capacity."""
    replay = getattr(buffer, "buffer", buffer)  # DaggerDataset holds a replay buffer
    stored = getattr(getattr(replay, "storage", None), "_storage", None)
    if isinstance(stored, TensorDictBase):
        return list(stored.values(include_nested=True, leaves_only=True))
    return [stored] if isinstance(stored, torch.Tensor) else []


def _disk_bytes(tensor: torch.Tensor, page: int = 4096) -> int:
    """``tensor``'s bytes on disk as one file, rounded up to whole pages."""
    return -(-tensor.numel() * tensor.element_size() // page) * page + page
