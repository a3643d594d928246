"""The learner's update against v0.2's, in one process (issue 19's "≤ 0.6x today's").

One imitation update of the shipped GoToLocal config (sample 16 x 32 slices from a DAgger
dataset of two collected batches, loss, backward, gradient clip, Adam) is timed for:

- ``v0.2``: the package at commit 3c419e7, extracted with ``git archive`` and imported as
  ``mop_torchrl_v02`` (its own config and update function, ``imitation_step``);
- ``float32`` and ``bfloat16``: this checkout's update (``autocast: off`` / ``bfloat16``).

The three alternate in blocks of 4 updates, so a busy machine slows them alike; the ratios are
medians of the per-round ratios to v0.2. One torch thread (the learner's on 2 cores). Needs
the git history (run from a clone)::

    python benchmarks/learner_vs_v02.py --rounds 20
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from throughput import filled_dataset, imitation_update  # this folder's

from mop_torchrl.bench import cpu_model
from mop_torchrl.train.config import load_config, native_bfloat16

ROOT = Path(__file__).resolve().parents[1]
V02 = "3c419e7"
CONFIG = "configs/go_to_local_mop.yaml"


def extract_v02(into: Path) -> None:
    """v0.2's package as ``into/mop_torchrl_v02`` (imports renamed) and its shipped config."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", V02, "mop_torchrl", CONFIG],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "mop_torchrl").rename(into / "mop_torchrl_v02")
    for path in (into / "mop_torchrl_v02").rglob("*.py"):
        path.write_text(re.sub(r"\bmop_torchrl\b", "mop_torchrl_v02", path.read_text()))


def v02_update(root: Path) -> Callable[[], None]:
    """v0.2's own update function (``imitation_step``: loss, backward, clip, Adam, metrics)."""
    config_type = importlib.import_module("mop_torchrl_v02.train.config").TrainConfig
    config = config_type.from_dict(yaml.safe_load((root / CONFIG).read_text()))
    torch.manual_seed(0)
    actor = importlib.import_module("mop_torchrl_v02.train.run").build_policy(config)[0]
    optimizer = torch.optim.Adam(actor.parameters(), lr=config.lr)
    step = importlib.import_module("mop_torchrl_v02.train.imitation").imitation_step(
        actor, optimizer, config
    )
    dataset = filled_dataset(actor, config, "mop_torchrl_v02")
    return lambda: step(dataset.sample(), 0)


def current_update(autocast: str) -> Callable[[], None]:
    """This checkout's update, as ``train_imitation`` runs it."""
    return imitation_update(load_config(ROOT / CONFIG, {"autocast": autocast}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="blocks of 4 updates each")
    parser.add_argument("--json", default=None, help="write the result here too")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        extract_v02(Path(tmp))
        sys.path.insert(0, tmp)
        updates = {
            "v0.2": v02_update(Path(tmp)),
            "float32": current_update("off"),
            "bfloat16": current_update("bfloat16"),
        }
        times: dict[str, list[float]] = {name: [] for name in updates}
        for update in updates.values():  # warm-up
            for _ in range(3):
                update()
        for _ in range(args.rounds):
            for name, update in updates.items():
                start = time.perf_counter()
                for _ in range(4):
                    update()
                times[name].append(1000 * (time.perf_counter() - start) / 4)
    result = {
        "cpu": cpu_model(),
        "native_bfloat16": native_bfloat16("cpu"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "rounds": args.rounds,
        "update_ms": {name: statistics.median(t) for name, t in times.items()},
        "ratio_to_v02": {
            name: statistics.median(a / b for a, b in zip(t, times["v0.2"]))
            for name, t in times.items()
        },
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
