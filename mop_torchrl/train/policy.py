"""The policy a training config describes, and its weights from a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from mop_torchrl.babyai.policy import make_policy
from mop_torchrl.train.checkpoint import CheckpointError, load_checkpoint
from mop_torchrl.train.config import TrainConfig

__all__ = ["build_policy", "load_actor", "load_modules"]


def build_policy(config: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """The actor and critic a config describes (``config.mop``'s ``input_dim`` is set to the
    encoder's output width by :func:`~mop_torchrl.babyai.policy.make_policy`)."""
    return make_policy(
        config.policy,
        mop=config.mop,
        gru_hidden_size=config.gru_hidden_size,
        encoder=config.encoder,
    )


def load_modules(payload: dict[str, Any], modules: dict[str, nn.Module], path: Path) -> None:
    """Loads a checkpoint's state dicts with a one-line error that says what does not fit."""
    for name, module in modules.items():
        if name not in payload["model"]:
            raise CheckpointError(f"checkpoint {str(path)!r} has no {name!r} weights")
        saved, own = payload["model"][name], module.state_dict()
        missing = [k for k in own if k not in saved]
        unexpected = [k for k in saved if k not in own]
        resized = [
            f"{k} {list(saved[k].shape)} vs {list(v.shape)}"
            for k, v in own.items()
            if k in saved and hasattr(saved[k], "shape") and saved[k].shape != v.shape
        ]
        if missing or unexpected or resized:
            policy = payload.get("config", {}).get("policy", "?")
            problems = [
                f"{len(items)} {what} (e.g. {items[0]})"
                for items, what in (
                    (missing, "missing weights"),
                    (unexpected, "unexpected weights"),
                    (resized, "size mismatches, saved vs this"),
                )
                if items
            ]
            raise CheckpointError(
                f"checkpoint {str(path)!r} (policy {policy!r}) does not fit this {name}: "
                + "; ".join(problems)
            )
        module.load_state_dict(saved)


def load_actor(checkpoint: str | Path) -> tuple[nn.Module, TrainConfig]:
    """The actor saved in a training checkpoint, in eval mode, and its config."""
    payload = load_checkpoint(checkpoint)
    config = TrainConfig.from_saved(payload["config"])
    actor, _ = build_policy(config)
    load_modules(payload, {"actor": actor}, Path(checkpoint))
    return actor.eval(), config
