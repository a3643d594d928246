"""What every training loop shares: run directory, logger, progress bar, checkpoints, metrics."""

from __future__ import annotations

import importlib.util
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from tensordict import TensorDictBase
from torch import nn
from tqdm.auto import tqdm

from mop_torchrl.policies import make_policy
from mop_torchrl.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mop_torchrl.train.config import TrainConfig

__all__ = ["EpisodeStats", "NonFiniteLossError", "Run", "build_policy"]

CHECKPOINT = "checkpoint.pt"
RESUMABLE_CHANGES = {
    "num_updates",
    "log_interval",
    "eval_episodes",
    "logger",
    "worker_log_level",
    "run_dir",
    "run_name",
}
"""Config keys a resumed run may change (e.g. to train for longer)."""


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss is NaN/inf; the last good checkpoint is left untouched."""


def build_policy(config: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """The actor and critic a config describes."""
    return make_policy(
        config.policy,
        mop=config.mop_config(),
        gru_hidden_size=config.gru_hidden_size,
        encoder=config.encoder_config(),
    )


class EpisodeStats:
    """Recent finished episodes (success, return, length, path ratio, bot failures)."""

    def __init__(self, window: int = 100) -> None:
        self.episodes: deque[dict[str, float]] = deque(maxlen=window)
        self.total = 0

    def add(self, data: TensorDictBase) -> None:
        """Adds the episodes that end inside a collected batch."""
        nxt = data["next"]
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
        if "bot_failures" in flat:
            rows["bot_failures"] = flat["bot_failures"]
        values = {k: v[done].tolist() for k, v in rows.items()}
        for i in range(int(done.sum())):
            self.episodes.append({k: v[i] for k, v in values.items()})
        self.total += int(done.sum())

    def summary(self) -> dict[str, float]:
        if not self.episodes:
            return {}
        keys = self.episodes[0].keys()
        out = {f"episode/{k}": sum(e[k] for e in self.episodes) / len(self.episodes) for k in keys}
        out["episode/count"] = float(self.total)
        return out


class Run:
    """A run directory with its resolved config, logger, progress bar and checkpoints.

    ``Run(config)`` starts a new run (refusing to overwrite an existing one);
    ``Run(config, resume=True)`` continues the run in ``config.run_dir/config.name``.
    """

    def __init__(self, config: TrainConfig, resume: bool = False) -> None:
        self.config = config
        self.dir = Path(config.run_dir) / config.name
        self.checkpoint_path = self.dir / CHECKPOINT
        if not resume and self.checkpoint_path.exists():
            raise FileExistsError(
                f"run directory {str(self.dir)!r} already holds a checkpoint: pass --resume "
                "to continue it, or choose another --run_name"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        self.logger = _make_logger(config.logger, self.dir)
        self.start_update = 0
        self.frames = 0
        self.extra: dict[str, Any] = {}
        self._bar: tqdm | None = None

    # -------------------------------------------------------------- checkpoints
    def restore(self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> None:
        """Loads the run's checkpoint, if any, into ``modules`` and ``optimizer``."""
        if not self.checkpoint_path.exists():
            return
        payload = load_checkpoint(self.checkpoint_path)
        # Keys added to TrainConfig after a checkpoint was written take their defaults.
        saved = {**TrainConfig().to_dict(), **payload["config"]}
        diff = {
            key: (saved[key], value)
            for key, value in self.config.to_dict().items()
            if key not in RESUMABLE_CHANGES and saved[key] != value
        }
        if diff:
            raise CheckpointError(
                f"checkpoint {str(self.checkpoint_path)!r} was written with other settings "
                f"(saved, now): {diff}"
            )
        load_modules(payload, modules, self.checkpoint_path)
        optimizer.load_state_dict(payload["optimizer"])
        set_rng_state(payload["rng"])
        self.start_update = payload["update"]
        self.frames = payload.get("frames", 0)
        self.extra = payload.get("extra", {})

    def save(
        self, update: int, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer
    ) -> Path:
        """Writes the checkpoint after ``update`` updates (atomically)."""
        return save_checkpoint(
            self.checkpoint_path,
            {
                "config": self.config.to_dict(),
                "model": {name: m.state_dict() for name, m in modules.items()},
                "optimizer": optimizer.state_dict(),
                "update": update,
                "frames": self.frames,
                "rng": rng_state(),
                "extra": self.extra,
            },
        )

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

        ``train_step(batch, update)`` does one optimizer update and returns its metrics.
        """
        config = self.config
        bar = self.progress(config.num_updates)
        tick = time.perf_counter()
        try:
            for update, data in batches:
                collect_time = time.perf_counter() - tick
                if stats is not None:
                    stats.add(data)
                metrics = train_step(data, update)
                self.frames += data.numel()
                train_time = time.perf_counter() - tick - collect_time
                self.extra["wall_s"] = self.extra.get("wall_s", 0.0) + collect_time + train_time
                done = update + 1
                bar.update(1)
                if done % config.log_interval == 0 or done == config.num_updates:
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
                    self.log(done, metrics)
                if done % config.checkpoint_interval == 0 or done == config.num_updates:
                    self.save(done, modules, optimizer)
                tick = time.perf_counter()
        finally:
            bar.close()


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
        raise NonFiniteLossError(
            f"non-finite loss ({loss.item()}) at update {update}: stopping; the last checkpoint "
            "was kept. Try a lower --lr or --alpha."
        )


def load_modules(payload: dict[str, Any], modules: dict[str, nn.Module], path: Path) -> None:
    """Loads a checkpoint's state dicts with an error that says what does not fit."""
    for name, module in modules.items():
        if name not in payload["model"]:
            raise CheckpointError(f"checkpoint {str(path)!r} has no {name!r} weights")
        try:
            module.load_state_dict(payload["model"][name])
        except RuntimeError as err:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not fit this {name} (different policy or sizes?): "
                f"{str(err).splitlines()[0]}"
            ) from err


LOGGER_PACKAGES = {"csv": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""The ``--logger`` choices and the package each needs."""


def _make_logger(kind: str, run_dir: Path):
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
