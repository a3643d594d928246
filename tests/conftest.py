from __future__ import annotations

import fcntl
import tempfile
from collections.abc import Callable
from pathlib import Path
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


@pytest.fixture(autouse=True)
def _one_cluster_at_a_time(request):
    """A test marked ``cluster`` (Ray or torch.distributed workers) waits for any other such test
    to end, in any pytest process of this machine (``make test`` runs two xdist workers)."""
    if request.node.get_closest_marker("cluster") is None:
        yield
        return
    with open(Path(tempfile.gettempdir()) / "mop_torchrl-tests-cluster.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


SHARED = {
    f"tests/{path.name}"
    for path in Path(__file__).parent.glob("test_*.py")
    if 'scope="module"' in path.read_text()
}
"""The test modules with a module-scoped fixture (a trained run, demos, a recording)."""


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``make test``'s two pytest-xdist workers take the tests one at a time, except that a
    module of :data:`SHARED` goes to one worker whole, so its fixture is made once."""
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerPerSharedModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in SHARED else nodeid

    return OneWorkerPerSharedModule(config, log)
