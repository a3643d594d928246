"""Each example script runs end to end for a few updates."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize(
    "script, args",
    [
        ("collector_replay.py", ["--frames", "256"]),
        ("imitation.py", ["--num_envs", "4", "--unroll_len", "8", "--num_updates", "2"]),
        ("ppo.py", ["--num_envs", "4", "--unroll_len", "8", "--num_updates", "2"]),
    ],
)
@pytest.mark.subprocess
@pytest.mark.slow
def test_example_runs(script, args):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]


def load_example(name: str):
    """Imports ``examples/{name}.py`` as a module (its ``main(argv)`` returns the results)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMOKE = {
    "recurrent_ppo": [
        *("--frames", "128", "--num_envs", "4", "--steps_per_batch", "16"),
        *("--epochs", "1", "--minibatches", "2"),
    ],
}
SMOKE["recurrent_ppo_cartpole"] = [*SMOKE["recurrent_ppo"], "--env", "cartpole"]


@pytest.mark.parametrize("core", ["mop", "gru"])
@pytest.mark.parametrize("example", list(SMOKE))
@pytest.mark.slow
def test_recurrent_recipe_smoke(example, core, tmp_path):
    out = tmp_path / "result.json"
    script = example.removesuffix("_cartpole")
    result = load_example(script).main([*SMOKE[example], "--core", core, "--out", str(out)])
    assert result["losses"] and all(math.isfinite(x) for x in result["losses"])
    assert json.loads(out.read_text())["curve"] == [list(c) for c in result["curve"]]
    # the hidden state propagates: the state stored at t+1 is the ("next", state) written at t
    # (within an episode), zero at episode starts, and not zero everywhere (recurrence alive)
    batch = result["last_batch"]  # [env, time]
    is_init = batch["is_init"].squeeze(-1)
    # the actor's and the critic's cores keep their states under their own keys
    state = batch.select("actor_state", "critic_state")
    keys = list(state.keys(include_nested=True, leaves_only=True))
    assert keys, "the core's hidden state is missing from the collected data"
    carried = ~is_init[:, 1:]
    assert carried.any()
    for key in keys:
        stored, written = batch[key], batch["next", key]
        assert (stored[is_init] == 0).all()
        torch.testing.assert_close(stored[:, 1:][carried], written[:, :-1][carried])
        assert written.abs().sum() > 0, f"{key} stays zero: recurrence is dead"
    if core == "mop":  # routing per block: one weight per expert ("0,16,32"), summing to 1
        assert [len(w) for w in result["routing"]] == [3, 3, 3]
        assert all(abs(sum(w) - 1) < 1e-5 for w in result["routing"])
