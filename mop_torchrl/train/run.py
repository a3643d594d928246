"""What every training loop uses: the run (its folder, logger, checkpoints) and per-update bookkeeping.

What may start in a run folder, its lock and the free-space check are
:mod:`~mop_torchrl.train.run_folder`'s; the signal deferral is :mod:`~mop_torchrl.train.signals`'.

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
import math
import shutil
import signal
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

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
)
from mop_torchrl.train.config import TrainConfig
from mop_torchrl.train.evaluate import bot_episodes, evaluate, grounding_probe
from mop_torchrl.train.logs import make_logger, truncate_csv_logs
from mop_torchrl.train.policy import load_modules
from mop_torchrl.train.run_folder import (
    CHECKPOINT,
    DiskFullError,
    RunLock,
    check_free_space,
    disk_bytes,
    no_space_cause,
    run_directory,
    stored_tensors,
    validate_start,
)
from mop_torchrl.train.signals import deferred_signals
from mop_torchrl.train.stats import EpisodeStats, MetricMeans

__all__ = [
    "NonFiniteLossError",
    "Run",
    "RunInterrupted",
    "Updates",
    "check_finite",
]


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss is NaN/inf; the last good checkpoint is left untouched."""


class RunInterrupted(Exception):
    """Raised by :meth:`Updates.end` after SIGINT or SIGTERM, once a checkpoint of the current
    update is saved; ``exit_code`` is the shell's 128 + signal number (130, 143)."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
        """Loads the run's checkpoint, if any, into ``modules`` and ``optimizer``; a new run
        with ``init_checkpoint`` starts from that checkpoint's actor weights instead (a
        curriculum: GoTo from a GoToLocal policy, PPO from an imitation one)."""
        payload, self._payload = self._payload, None
        if payload is None:
            if self.config.init_checkpoint:
                source = Path(self.config.init_checkpoint)
                load_modules(load_checkpoint(source), {"actor": modules["actor"]}, source)
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
            check_free_space(self.dir, self._bytes_needed(modules, optimizer))
            path = self._write(update, modules, optimizer)
        except (OSError, RuntimeError) as err:
            if not no_space_cause(err):
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
                f"({no_space_cause(err)}); {last}. Free some space, then continue with --resume "
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
        dumps = [t for buffer in self.buffers.values() for t in stored_tensors(buffer)]
        return sum(disk_bytes(t) for t in dumps + state) + 256 * 1024

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
            with deferred_signals() as received:
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
        if stats is not None:
            run.extra["episodes"] = stats.total  # saved with the checkpoint: resumed runs go on
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
