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
import importlib.util
import logging
import math
import re
import shutil
import signal
import tempfile
import threading
import time
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
    """A run that cannot start as asked (name taken, nothing to resume, unusable inputs)."""


class RunInterrupted(Exception):
    """Raised by :meth:`Updates.end` after SIGINT, once a checkpoint of the current update is
    saved."""


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
    """

    def __init__(self, config: TrainConfig, resume: bool = False) -> None:
        self.config = config
        self.dir = run_directory(config)
        self.checkpoint_path = self.dir / CHECKPOINT
        self._payload = validate_start(config, resume)
        self.start_update = self._payload["update"] if self._payload else 0
        self.saved_update: int | None = self.start_update if self._payload else None
        self.dir.mkdir(parents=True, exist_ok=True)
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
        """Writes the tracked buffers, then the checkpoint after ``update`` updates (atomically)."""
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
        """The loop's bookkeeping (:class:`Updates`), with a progress bar and SIGINT deferred.

        A first SIGINT lets the current update finish and be checkpointed, then
        :meth:`Updates.end` raises :class:`RunInterrupted`. A :class:`NonFiniteLossError`
        leaving the block gets the checkpoint that was kept added to its message.
        """
        config = self.config
        self._bar = tqdm(
            total=config.num_updates,
            initial=self.start_update,
            desc=config.name,
            dynamic_ncols=True,
        )
        try:
            with _deferred_sigint() as interrupted:
                yield Updates(self, modules, optimizer, interrupted)
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
        interrupted: Callable[[], bool],
    ) -> None:
        self.run, self.modules, self.optimizer = run, modules, optimizer
        self.interrupted = interrupted
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
        metrics; at the checkpoint interval, the last update or after SIGINT a checkpoint.
        Raises :class:`RunInterrupted` after SIGINT.
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
        if (
            done % config.checkpoint_interval == 0
            or done == config.num_updates
            or self.interrupted()
        ):
            run.save(done, self.modules, self.optimizer)
        if self.interrupted():
            raise RunInterrupted(
                f"interrupted: checkpoint saved at update {done}; continue with --resume {run.dir}"
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
def _deferred_sigint() -> Iterator[Callable[[], bool]]:
    """While active, a first SIGINT only sets a flag (read with the yielded function); a second
    one raises ``KeyboardInterrupt`` as usual. Outside the main thread it does nothing."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag.is_set
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag.is_set
    finally:
        signal.signal(signal.SIGINT, previous)
