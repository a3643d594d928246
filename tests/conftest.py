from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from tiny import tiny_settings


@pytest.fixture(autouse=True)
def _single_thread_seeded():
    """One intra-op thread (env workers share 2 cores; OpenMP spin-waits otherwise) and a seed."""
    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.fixture
def tiny_config(tmp_path) -> Callable[..., Any]:
    """``tiny_config(**overrides)``: the tiny :class:`TrainConfig` (``tests/tiny.py``) whose runs
    go under this test's ``tmp_path``."""
    from mop_torchrl.train.config import TrainConfig

    def make(**overrides: Any) -> TrainConfig:
        return TrainConfig.from_dict(tiny_settings(run_dir=str(tmp_path), **overrides))

    return make
