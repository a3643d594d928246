"""The smallest training settings that exercise every part of a run (the tests' one copy).

A 2-env, 8-step MoP with a two-block ``0,8;8,16`` core and a small encoder trains one update
in well under a second. Keys are the config tree's dotted names, so the same dict serves
``TrainConfig.from_dict`` and, through :func:`tiny_flags`, the command line.
"""

from __future__ import annotations

from typing import Any

TINY: dict[str, Any] = {
    "num_envs": 2,
    "unroll_len": 8,
    "mop.layers": "0,8;8,16",
    "mop.intermediate_dim": 16,
    "mop.router_dim": 8,
    "encoder.image_channels": 8,
    "encoder.instr_dim": 16,
    "gru_hidden_size": 16,
    "eval_episodes": 0,
    "log_interval": 1,
}


def tiny_settings(**overrides: Any) -> dict[str, Any]:
    """:data:`TINY` with ``overrides`` (dotted keys for the nested sections)."""
    return {**TINY, **overrides}


def tiny_flags(**overrides: Any) -> list[str]:
    """:func:`tiny_settings` as ``mop-torchrl train`` flags."""
    return [f"--{key}={value}" for key, value in tiny_settings(**overrides).items()]
