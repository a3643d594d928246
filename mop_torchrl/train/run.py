"""What every training loop shares: run directory, logger, progress bar, checkpoints, metrics."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import shutil
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from tensordict import TensorDictBase
from torch import nn
from tqdm.auto import tqdm

from mop_torchrl.babyai.levels import level_name
from mop_torchrl.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    remove_orphan_temps,
    save_checkpoint,
    seed_everything,
)
from mop_torchrl.train.config import TrainConfig
from mop_torchrl.train.policy import build_policy, load_modules

__all__ = [
    "EpisodeStats",
    "NonFiniteLossError",
    "Run",
    "RunError",
    "RunInterrupted",
    "validate_start",
]

CHECKPOINT = "checkpoint.pt"
RESUMABLE_CHANGES = {
    "num_updates",
    "log_interval",
    "eval_episodes",
    "eval_interval",
    "eval_interval_episodes",
    "logger",
    "worker_log_level",
    "run_dir",
    "run_name",
}
"""Config keys a resumed run may change (e.g. to train for longer)."""


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss is NaN/inf; the last good checkpoint is left untouched."""


class RunError(ValueError):
    """A run that cannot start as asked (name taken, nothing to resume, unusable inputs)."""


class RunInterrupted(Exception):
    """Raised by :meth:`Run.fit` after SIGINT, once a checkpoint of the current update is saved."""


class EpisodeStats:
    """Recent finished episodes (success, return, length, path ratio, bot failures).

    With ``levels`` (multi-level runs, whose data carry ``"level"``) the summary also reports
    each level's episodes (``episode/<level>/<metric>``, a window per level) and its mean
    routing cost per step over the last batches (``routing/<level>/cost``, MoP policies).
    """

    def __init__(self, window: int = 100, levels: Sequence[str] = ()) -> None:
        self.episodes: deque[dict[str, float]] = deque(maxlen=window)
        self.levels = [level_name(level) for level in levels] if len(levels) > 1 else []
        self.per_level = [deque(maxlen=window) for _ in self.levels]
        self.level_cost = [deque(maxlen=10) for _ in self.levels]
        self.total = 0

    def add(self, data: TensorDictBase) -> None:
        """Adds the episodes that end inside a collected batch."""
        nxt = data["next"]
        if self.levels and ("routing", "cost") in data.keys(True):
            level, cost = data["level"].reshape(-1), data["routing", "cost"].reshape(-1)
            for i, costs in enumerate(self.level_cost):
                if (level == i).any():
                    costs.append(cost[level == i].mean().item())
        done = nxt["done"].reshape(-1)
        if not done.any():
            return
        flat = {
            key: nxt[key].reshape(-1).float()
            for key in (
                "success",
                "episode_reward",
                "step_count",
                "bot_solution_length",
                "bot_failures",
                "bot_errors",
            )
            if key in nxt
        }
        rows = {
            "success": flat["success"],
            "return": flat["episode_reward"],
            "length": flat["step_count"],
        }
        if "bot_solution_length" in flat:
            rows["path_ratio"] = flat["step_count"] / flat["bot_solution_length"].clamp(min=1)
        for key in ("bot_failures", "bot_errors"):
            if key in flat:
                rows[key] = flat[key]
        values = {k: v[done].tolist() for k, v in rows.items()}
        levels = nxt["level"].reshape(-1)[done].tolist() if self.levels else []
        for i in range(int(done.sum())):
            episode = {k: v[i] for k, v in values.items()}
            self.episodes.append(episode)
            if self.levels:
                self.per_level[levels[i]].append(episode)
        self.total += int(done.sum())

    def summary(self) -> dict[str, float]:
        out = {}
        for prefix, episodes in [
            ("episode", self.episodes),
            *((f"episode/{n}", e) for n, e in zip(self.levels, self.per_level)),
        ]:
            for key in ("success", "return", "length", "path_ratio") if episodes else ():
                if key in episodes[0]:
                    out[f"{prefix}/{key}"] = sum(e[key] for e in episodes) / len(episodes)
        if self.episodes:
            for key in ("bot_failures", "bot_errors"):
                if key in self.episodes[0]:
                    out[f"episode/{key}"] = sum(e[key] for e in self.episodes) / len(self.episodes)
            out["episode/count"] = float(self.total)
        for name, costs in zip(self.levels, self.level_cost):
            if costs:
                out[f"routing/{name}/cost"] = sum(costs) / len(costs)
        return out


class Run:
    """A run directory with its resolved config, logger, progress bar and checkpoints.

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
        in between keeps the previous, consistent pair.
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
        for name, buffer in self.buffers.items():
            path = self.dir / saved[name]
            if path.exists():
                shutil.rmtree(path)
            path.parent.mkdir(exist_ok=True)
            buffer.dumps(path)
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
            },
        )
        for stale in (self.dir / "buffers").glob("*") if saved else ():
            if str(stale.relative_to(self.dir)) not in saved.values():
                shutil.rmtree(stale)
        self.saved_update = update
        return path

    def held_out(self, actor: nn.Module) -> dict[str, float]:
        """``eval/*`` metrics: greedy success on ``eval_interval_episodes`` held-out episodes and
        the grounding probe on as many bot episodes. It runs between a ``train_step`` and the
        next re-seeding, so the random numbers it draws do not change the training run."""
        from mop_torchrl.train.evaluate import bot_episodes, evaluate, grounding_probe

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

    # -------------------------------------------------------------- progress and logs
    def progress(self, total: int) -> tqdm:
        self._bar = tqdm(
            total=total, initial=self.start_update, desc=self.config.name, dynamic_ncols=True
        )
        return self._bar

    def log(self, update: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            if isinstance(value, float | int) and math.isfinite(value):
                self.logger.log_scalar(name, float(value), step=update)
        if self._bar is not None:
            short = {k.split("/")[-1]: v for k, v in metrics.items() if k in _BAR_KEYS}
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in short.items()}, refresh=False)

    def fit(
        self,
        batches: Iterator[tuple[int, TensorDictBase]],
        train_step: Callable[[TensorDictBase, int], dict[str, float]],
        modules: dict[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        stats: EpisodeStats | None = None,
    ) -> None:
        """The loop every algorithm shares: time, train, log, checkpoint, show progress.

        ``train_step(batch, update)`` does one optimizer update and returns its metrics. The
        global generators are re-seeded from ``(seed, update)`` before each batch is drawn and
        before each ``train_step`` (:func:`~mop_torchrl.train.checkpoint.seed_everything`), so
        a run resumed in a fresh process repeats an uninterrupted one exactly. SIGINT finishes
        the current update, saves a checkpoint of it and raises :class:`RunInterrupted`.
        """
        config = self.config
        bar = self.progress(config.num_updates)
        tick = time.perf_counter()
        update = self.start_update
        try:
            with _deferred_sigint() as interrupted:
                while True:
                    _own_threads(config.torch_threads)
                    seed_everything(config.seed, update, "collect")
                    item = next(batches, None)
                    if item is None:
                        break
                    update, data = item
                    collect_time = time.perf_counter() - tick
                    if stats is not None:
                        stats.add(data)
                    _own_threads(config.torch_threads)
                    seed_everything(config.seed, update, "train")
                    metrics = train_step(data, update)
                    self.frames += data.numel()
                    train_time = time.perf_counter() - tick - collect_time
                    self.extra["wall_s"] = self.extra.get("wall_s", 0.0) + collect_time + train_time
                    update += 1
                    bar.update(1)
                    if update % config.log_interval == 0 or update == config.num_updates:
                        metrics.update(stats.summary() if stats is not None else {})
                        metrics.update(
                            {
                                "perf/frames": self.frames,
                                "perf/wall_s": self.extra["wall_s"],
                                "perf/frames_per_s": data.numel() / (collect_time + train_time),
                                "perf/collect_s": collect_time,
                                "perf/train_s": train_time,
                            }
                        )
                        self.log(update, metrics)
                    if config.eval_interval and update % config.eval_interval == 0:
                        self.log(update, self.held_out(modules["actor"]))
                    last = update == config.num_updates
                    if update % config.checkpoint_interval == 0 or last or interrupted():
                        self.save(update, modules, optimizer)
                    if interrupted():
                        raise RunInterrupted(
                            f"interrupted: checkpoint saved at update {update}; continue with "
                            f"--resume {self.dir}"
                        )
                    tick = time.perf_counter()
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
            bar.close()
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # shut the collector down now, not when garbage-collected


def _own_threads(threads: int) -> None:
    """Sets torch's thread count back to the run's: torchrl raises it whenever a batched env
    closes, even at garbage collection long after an evaluation, and updates would otherwise
    run with other threads (other rounding, and OpenMP spin-waiting against the envs)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


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


def check_finite(loss: torch.Tensor, update: int) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"non-finite loss ({loss.item()}) at update {update}")


def run_directory(config: TrainConfig) -> Path:
    """The directory of the run ``config`` describes: ``run_dir/name``."""
    return Path(config.run_dir) / config.name


def validate_start(
    config: TrainConfig, resume: bool, overwrite: bool = False
) -> dict[str, Any] | None:
    """Checks that the run can start, without touching the disk; returns the checkpoint to resume.

    Checked: the level exists; BC demos open and hold that level; an ``init_checkpoint`` loads
    into this policy; the run directory is writable; a new run does not reuse a directory
    (unless ``overwrite``, and then only one holding a ``config.yaml``); a resumed run's
    checkpoint is readable, was written with the same settings, and is not past
    ``num_updates``.

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
    checkpoint = run_dir / CHECKPOINT
    payload = None
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other")
    if resume and checkpoint.exists():
        payload = load_checkpoint(checkpoint)
        # Keys added to TrainConfig after a checkpoint was written take their defaults.
        saved = {**TrainConfig().to_dict(), **payload["config"]}
        diff = {
            key: (saved[key], value)
            for key, value in config.to_dict().items()
            if key not in RESUMABLE_CHANGES and saved[key] != value
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
    elif not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            held = "a checkpoint" if checkpoint.exists() else "files of another run"
            raise RunError(
                f"run directory {str(run_dir)!r} already holds {held}: pass --resume to "
                "continue it, --overwrite to start again, or choose another --run_name"
            )
        if not (run_dir / "config.yaml").is_file():
            raise RunError(
                f"--overwrite refuses to delete {str(run_dir)!r}: it is not a run directory "
                "(no config.yaml)"
            )
    if config.algo == "ppo" and config.init_checkpoint and payload is None:
        actor, _ = build_policy(config)
        source = Path(config.init_checkpoint)
        load_modules(load_checkpoint(source), {"actor": actor}, source)
    return payload


def remove_run(config: TrainConfig) -> None:
    """Deletes the run directory ``config`` names (``--overwrite``; validate it first)."""
    shutil.rmtree(run_directory(config), ignore_errors=False)


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


def truncate_csv_logs(log_dir: Path, step: int) -> None:
    """Keeps only the rows with ``step <= step`` in every CSV scalar file under ``log_dir``.

    A resumed run re-logs the updates after its checkpoint; without this they would appear
    twice (and a run resumed without a checkpoint would log on top of the old run).
    """
    for path in sorted((log_dir / "scalars").rglob("*.csv")):
        kept = []
        for line in path.read_text().splitlines():
            head = line.split(",", 1)[0]
            if line.count(",") == 1 and head.lstrip("-").isdigit() and int(head) <= step:
                kept.append(line + "\n")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


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


LOGGER_PACKAGES = {"csv": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""The ``--logger`` choices and the package each needs."""


def make_logger(kind: str, run_dir: Path):
    """The run's logger from TorchRL's own factory (``torchrl.record.loggers.get_logger``).

    Everything lands in ``run_dir``: CSV/TensorBoard under ``logs/``, MLflow as a file store
    (``mlflow ui --backend-store-uri <run_dir>``), W&B offline under ``wandb/`` (upload it
    later with ``wandb sync``). A missing package is a one-line ``ImportError``.
    """
    package = LOGGER_PACKAGES[kind]
    if package is not None and importlib.util.find_spec(package) is None:
        raise ImportError(f"--logger {kind} needs the {package!r} package: pip install {package}")
    from torchrl.record.loggers import get_logger

    wandb_kwargs = {"offline": True, "project": "mop_torchrl"}  # its save_dir is run_dir
    return get_logger(kind, str(run_dir), "logs", wandb_kwargs=wandb_kwargs)
