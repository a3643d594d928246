"""Training loops (online imitation, behaviour cloning, PPO), checkpoints and evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mop_torchrl.train.config import RESUMABLE_CHANGES, TrainConfig, load_config

__all__ = ["TrainConfig", "load_config", "resume", "resume_config", "train"]


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Runs the loop ``config.algo`` names; returns the run directory.

    ``resume=True`` continues the run directory's checkpoint (or starts it if there is none);
    ``overwrite=True`` deletes an existing run of the same name first. Everything is checked
    before the disk is touched (:func:`~mop_torchrl.train.run_folder.validate_start`).

    Examples:
        >>> config = TrainConfig.from_dict({"task_id": "GoToLocal", "mop_layers": "0,8;8,16"})
        >>> config.name, config.mop.layers
        ('imitation-mop-GoToLocal-s0', [[0, 8], [8, 16]])

        ``train(config)`` would then write ``runs/imitation-mop-GoToLocal-s0/``.
    """
    torch.set_num_threads(config.torch_threads)
    if overwrite:
        from mop_torchrl.train.run_folder import remove_run, validate_start

        validate_start(config, resume, overwrite=True)
        if Path(config.run_dir, config.name).exists():
            remove_run(config)
    if config.algo == "imitation":
        from mop_torchrl.train.imitation import train_imitation as loop
    elif config.algo == "bc":
        from mop_torchrl.train.bc import train_bc as loop
    else:
        from mop_torchrl.train.ppo import train_ppo as loop
    run_dir = loop(config, resume)
    if config.eval_episodes > 0:
        from mop_torchrl.train.evaluate import evaluate_checkpoint

        result = evaluate_checkpoint(run_dir / "checkpoint.pt", episodes=config.eval_episodes)
        (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    return run_dir


def resume(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> Path:
    """Continues the run in ``run_dir`` from its last checkpoint, with its saved config."""
    return train(resume_config(run_dir, overrides), resume=True)


def resume_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The saved config of the run in ``run_dir``, checked for resuming.

    ``overrides`` may change only what does not alter the training so far
    (:data:`~mop_torchrl.train.config.RESUMABLE_CHANGES`: ``num_updates`` to train for longer,
    ``log_interval``, ``eval_episodes``, ``logger`` ...); the run's place is ``run_dir`` itself
    (``run_dir``/``run_name`` overrides are refused).
    """
    run_dir = Path(run_dir)
    if run_dir.name in ("", ".", ".."):  # `--resume .`: the run is named by the real directory
        run_dir = run_dir.resolve()
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    placed = sorted({"run_dir", "run_name"} & set(overrides or {}))
    if placed:
        flags = "/".join(f"--{key}" for key in placed)
        raise ValueError(
            f"--resume RUN_DIR names the run to continue: drop {flags} (to continue it "
            "elsewhere, move or copy the run directory first)"
        )
    refused = sorted(set(overrides or {}) - RESUMABLE_CHANGES)
    if refused:
        raise ValueError(
            f"a resumed run keeps its config; {refused} cannot change "
            f"(only {sorted(RESUMABLE_CHANGES)} can)"
        )
    config = load_config(run_dir / "config.yaml", overrides, saved=True)
    config.run_dir, config.run_name = str(run_dir.parent), run_dir.name
    return config
