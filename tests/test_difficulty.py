"""benchmarks/difficulty.py: frames to a label-accuracy threshold, trained a chunk at a time."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from tiny import tiny_settings

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "difficulty.py"


@pytest.fixture(scope="module")
def difficulty():
    spec = importlib.util.spec_from_file_location("difficulty", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_runs_resume_until_the_threshold_or_the_budget(difficulty, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_settings(updates_per_batch=1, batch_slices=2)))
    flags = ["--config", str(config), "--levels", "GoToRedBallNoDists", "--seeds", "0"]
    flags += ["--hidden", "16", "--interval", "1", "--probe_episodes", "2", "--max_frames", "32"]
    flags += ["--run_dir", str(tmp_path / "runs")]
    never = difficulty.main([*flags, "--threshold", "1.01", "--out", str(tmp_path / "a.json")])
    (run,) = never["runs"]
    assert run["frames"] is None and run["trained_frames"] == 32  # 2 updates of 2 x 8 frames
    assert [row[0] for row in run["label_accuracy"]] == [1, 2]  # evaluated after each update
    assert never["table"]["GoToRedBallNoDists"]["median"] is None
    # started again with a larger budget, it continues the stopped run instead of starting over
    flags[flags.index("--max_frames") + 1] = "48"
    longer = difficulty.main([*flags, "--threshold", "1.01", "--out", str(tmp_path / "a.json")])
    (continued,) = longer["runs"]
    assert continued["trained_frames"] == 48
    assert continued["label_accuracy"][:2] == run["label_accuracy"]
    # trained a chunk of 2 updates at a time, it still reads the frames at each evaluation
    flags[flags.index("--run_dir") + 1] = str(tmp_path / "fresh")
    flags += ["--chunk", "2"]
    at_once = difficulty.main([*flags, "--threshold", "0", "--out", str(tmp_path / "b.json")])
    assert at_once["runs"][0]["frames"] == 16 and at_once["runs"][0]["trained_frames"] == 32
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["table"]["GoToRedBallNoDists"]["median"] == 16
