"""benchmarks/classic_pomdp.py: a run per (task, cores, seed), each a real example process."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "classic_pomdp.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("classic_pomdp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while it is built
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.subprocess
@pytest.mark.slow
def test_actor_and_critic_cores_run_and_are_summarised_apart(bench, tmp_path):
    """``mop+gru``: the example gets ``--core mop --critic_core gru``, its record is named as the
    docs' are (``mop_critic_gru``), and the summary keeps it apart from ``mop`` (the recipe's
    default critic) and names the critic in its table."""
    bench.run_all(tmp_path, ["cartpole"], [0], {"cartpole": 512}, cores=("mop+gru",))
    record = json.loads((tmp_path / "cartpole_mop_critic_gru_s0.json").read_text())
    assert (record["core"], record["critic_core"], record["frames"]) == ("mop", "gru", 512)
    assert record["mop_layers"] == "0,32,64"  # the recipe's one-block CartPole default
    assert record["process_cpu_s"] > 0
    summary = bench.summarise(tmp_path)
    assert list(summary) == ["cartpole/mop+gru"]
    assert [len(w) for w in summary["cartpole/mop+gru"]["routing"][0]] == [3]
    assert "| cartpole | mop + gru critic |" in bench.table(summary)
    # a finished run is not run again
    assert bench.pending_runs(tmp_path, ["cartpole"], [0], 1, ("mop+gru", "gru")) == [
        bench.Run("cartpole", "gru", 0)
    ]


def test_runs_in_parallel_start_longest_first(bench, tmp_path):
    """With several processes the default table's Pendulum runs start first (MoP first), then
    CartPole's: on 16 processes for 18 runs the two that wait are CartPole baselines, where
    seed by seed they were Pendulum ones; one process keeps the seed-by-seed order."""
    runs = bench.pending_runs(tmp_path, ["cartpole", "pendulum"], [0, 1, 2], 16)
    assert [(r.task, r.core) for r in runs[:3]] == [("pendulum", "mop")] * 3
    assert {r.task for r in runs[:9]} == {"pendulum"}
    assert [(r.task, r.core, r.seed) for r in runs[-2:]] == [
        ("cartpole", "gru", 2),
        ("cartpole", "lstm", 2),
    ]
    serial = bench.pending_runs(tmp_path, ["cartpole", "pendulum"], [0, 1], 1)
    assert [(r.task, r.seed) for r in serial[:4]] == [("cartpole", 0)] * 3 + [("pendulum", 0)]
