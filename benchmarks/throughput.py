"""Training throughput, stage by stage (Sample Factory's distinction), in frames per second.

For each level, with the shipped GoToLocal settings (MoP ``seed`` preset, 16 envs x 32 steps,
4 updates of 16 x 32 slices per batch; the student always acts, β = 0) unless flags say
otherwise:

- ``env``: the batched env alone, random actions (``env.rollout``);
- ``env+bot``: the same with the bot labelling every step (what imitation steps);
- ``collect``: the training collector with the policy acting greedily, bot labels on, in this
  process (``inprocess``) and with ``multiprocess`` for each ``--workers`` count;
- ``learner``: optimizer updates per second on a filled DAgger dataset, and the frames they
  consume (``batch_slices x slice_len`` per update) and the env frames per second they can
  keep up with (one batch per ``updates_per_batch`` updates);
- ``train``: end-to-end training frames/s (``mop-torchrl train`` without evaluation), with
  collection ``sync`` in process, ``overlap`` (one collector worker one batch ahead), and
  ``multiprocess`` sync/overlap for each ``--workers`` count. ``steady`` excludes start-up
  (worker start, first batch) and checkpoints: it is the loop's own ``perf/wall_s``.

Rows of one run are comparable; runs on a shared machine are not (the load average is
recorded). Short by default (a few minutes on 2 cores); on a bigger machine::

    python benchmarks/throughput.py --workers 1,2,4,8 --updates 40
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchrl
from tensordict.nn import InteractionType
from torch import nn

from mop_torchrl.babyai.envs import make_babyai_env
from mop_torchrl.train import TrainConfig, train
from mop_torchrl.train.checkpoint import load_checkpoint
from mop_torchrl.train.collection import env_factories, make_collector
from mop_torchrl.train.config import load_config
from mop_torchrl.train.losses import imitation_loss, learner_autocast, total_loss
from mop_torchrl.train.policy import build_policy
from mop_torchrl.train.stats import MetricMeans

SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "go_to_local_mop.yaml"


def env_frames_per_s(config: TrainConfig, expert: bool, steps: int) -> float:
    """Random-action frames/s of the config's batched env (bot labels on with ``expert``)."""
    torch.set_num_threads(1)
    env = make_babyai_env(config.task_id, num_envs=config.num_envs, seed=config.seed, expert=expert)
    try:
        env.rollout(4, break_when_any_done=False)  # warm-up
        start = time.perf_counter()
        env.rollout(steps, break_when_any_done=False)
        return config.num_envs * steps / (time.perf_counter() - start)
    finally:
        env.close()


def collect_frames_per_s(config: TrainConfig, batches: int) -> dict[str, float]:
    """Greedy-policy collection frames/s with the config's backend (bot labels on)."""
    # Closing a batched env raises torch's thread count (torchrl 0.14); with spin-waiting
    # OpenMP threads on a busy machine the in-process collector then ran 20x slower.
    torch.set_num_threads(config.collector_threads)
    torch.manual_seed(config.seed)
    actor = build_policy(config)[0].eval()
    frames = config.num_envs * config.unroll_len
    start = time.perf_counter()
    collector = make_collector(
        config,
        actor,
        env_factories(config, expert=True, seed=config.seed),
        frames * (batches + 1),
        InteractionType.DETERMINISTIC,
    )
    try:
        iterator = iter(collector)
        next(iterator)  # workers up, envs reset
        startup = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        elapsed = time.perf_counter() - start
    finally:
        collector.shutdown()
    return {"frames_per_s": batches * frames / elapsed, "startup_s": startup}


def filled_dataset(actor: nn.Module, config, package: str = "mop_torchrl") -> Any:
    """``package``'s DAgger dataset (this one's, or an older copy's imported beside it) holding
    two batches that ``actor`` collected with bot labels (the update's cost does not depend on
    how full the dataset is). ``config`` is ``package``'s, with in-process sync collection."""
    segment_batches = importlib.import_module(f"{package}.train.collection").segment_batches
    dagger = importlib.import_module(f"{package}.train.dagger")
    dataset = dagger.DaggerDataset(
        actor.in_keys, config.buffer_frames, config.slice_len, config.burn_in, config.batch_slices
    )
    batches = segment_batches(actor.eval(), config, 0, expert=True)
    try:
        for _ in range(2):
            dataset.extend(next(batches)[1])
    finally:
        batches.close()
    actor.train()
    return dataset


def imitation_update(config: TrainConfig) -> Callable[[], None]:
    """One imitation update as ``train_imitation`` runs it (sample, loss under the config's
    autocast, backward, clip, Adam, metrics) on a :func:`filled_dataset`."""
    torch.manual_seed(config.seed)
    actor = build_policy(config)[0]
    loss_module = imitation_loss(actor, config)
    optimizer = torch.optim.Adam(actor.parameters(), lr=config.lr, fused=True)
    metrics = MetricMeans()
    dataset = filled_dataset(
        actor, TrainConfig.from_dict({**config.to_dict(), "collection": "sync"})
    )

    def update() -> None:
        with learner_autocast(config):
            losses = loss_module(dataset.sample())
        loss = total_loss(losses)
        optimizer.zero_grad()
        loss.backward()
        norm = nn.utils.clip_grad_norm_(actor.parameters(), config.max_grad_norm, foreach=True)
        optimizer.step()
        metrics.add(losses, "train/")
        metrics.add({"train/loss": loss, "train/grad_norm": norm})

    return update


def learner_rate(config: TrainConfig, updates: int) -> dict[str, float]:
    """Updates/s of :func:`imitation_update`, and the frames they consume and keep up with."""
    update = imitation_update(config)
    times = []
    for i in range(updates + 3):
        start = time.perf_counter()
        update()
        if i >= 3:
            times.append(time.perf_counter() - start)
    per_update = statistics.median(times)
    consumed = config.batch_slices * (config.burn_in + config.slice_len)
    per_batch = config.num_envs * config.unroll_len
    return {
        "update_ms": 1000 * per_update,
        "updates_per_s": 1 / per_update,
        "frames_consumed_per_s": consumed / per_update,
        "env_frames_per_s_sustained": per_batch / (config.updates_per_batch * per_update),
    }


def train_rate(config: TrainConfig, run_dir: str, name: str) -> dict[str, float]:
    """End-to-end frames/s of a training run (no evaluation): over the wall time of the
    whole call, and steady (the loop's own time, without start-up and checkpoints)."""
    config = TrainConfig.from_dict(
        {**config.to_dict(), "run_dir": run_dir, "run_name": name, "logger": "csv"}
    )
    start = time.perf_counter()
    path = train(config)
    wall = time.perf_counter() - start
    payload = load_checkpoint(path / "checkpoint.pt")
    frames = payload["frames"]
    return {
        "frames": frames,
        "wall_s": wall,
        "frames_per_s": frames / wall,
        "steady_frames_per_s": frames / payload["extra"]["wall_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="GoToLocal,PutNextLocal")
    parser.add_argument("--config", default=str(SHIPPED), help="base settings (YAML)")
    parser.add_argument("--workers", default="1,2", help='multiprocess worker counts ("0": none)')
    parser.add_argument("--updates", type=int, default=16, help="updates per training row")
    parser.add_argument("--batches", type=int, default=4, help="timed batches per collect row")
    parser.add_argument("--env_steps", type=int, default=64, help="steps per env row")
    parser.add_argument(
        "--stages", default="env,env+bot,collect,learner,train", help="which rows to measure"
    )
    parser.add_argument("--json", default=None, help="output (default: bench_results/...)")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",") if w.strip() and int(w) > 0]
    stages = set(args.stages.split(","))
    base = load_config(args.config)
    rows: list[dict] = []

    def record(level: str, stage: str, setting: str, result: dict) -> None:
        rows.append({"level": level, "stage": stage, "setting": setting, **result})
        shown = {k: round(v, 1) for k, v in result.items() if isinstance(v, float)}
        print(f"{level:>14} {stage:>8} {setting:>22}: {shown}", flush=True)

    with tempfile.TemporaryDirectory() as run_dir:
        for level in args.levels.split(","):
            # β = 0: the multi-worker backends cannot let the bot act, and rows must compare
            common = {"task_id": level, "eval_episodes": 0, "eval_interval": 0, "dagger_beta": 0.0}
            config = TrainConfig.from_dict({**base.to_dict(), **common, "torch_threads": 0})
            torch.set_num_threads(1)
            if "env" in stages:
                fps = env_frames_per_s(config, False, args.env_steps)
                record(level, "env", "random actions", {"frames_per_s": fps})
            if "env+bot" in stages:
                fps = env_frames_per_s(config, True, args.env_steps)
                record(level, "env+bot", "random actions", {"frames_per_s": fps})
            if "collect" in stages:
                record(level, "collect", "inprocess", collect_frames_per_s(config, args.batches))
                for n in workers:
                    multi = TrainConfig.from_dict(
                        {**config.to_dict(), "backend": "multiprocess", "num_workers": n}
                    )
                    result = collect_frames_per_s(multi, args.batches)
                    record(level, "collect", f"multiprocess x{n}", result)
            if "learner" in stages:
                torch.set_num_threads(config.torch_threads)
                record(
                    level,
                    "learner",
                    f"{config.torch_threads} threads, autocast {config.autocast}",
                    learner_rate(config, args.updates),
                )
            if "train" in stages:
                settings = [("sync", "inprocess", 1), ("overlap", "inprocess", 1)]
                settings += [(c, "multiprocess", n) for n in workers for c in ("sync", "overlap")]
                for collection, backend, n in settings:
                    train_config = TrainConfig.from_dict(
                        {
                            **config.to_dict(),
                            "collection": collection,
                            "backend": backend,
                            "num_workers": n,
                            "torch_threads": 0,
                            "num_updates": args.updates,
                            "checkpoint_interval": args.updates,
                            "log_interval": args.updates,
                        }
                    )
                    setting = (
                        f"{backend} x{n} {collection}"
                        if n > 1 or backend != "inprocess"
                        else collection
                    )
                    name = f"{level}-{backend}-{n}-{collection}"
                    record(level, "train", setting, train_rate(train_config, run_dir, name))

    print("\n| level | stage | setting | frames/s | notes |\n|---|---|---|---|---|")
    for row in rows:
        fps = row.get("frames_per_s", row.get("frames_consumed_per_s"))
        notes = []
        if "steady_frames_per_s" in row:
            notes.append(f"steady {row['steady_frames_per_s']:.0f}")
        if "startup_s" in row:
            notes.append(f"start-up {row['startup_s']:.1f} s")
        if "update_ms" in row:
            notes.append(
                f"{row['update_ms']:.0f} ms/update, {row['updates_per_s']:.1f} updates/s, "
                f"keeps up with {row['env_frames_per_s_sustained']:.0f} env frames/s"
            )
        print(
            f"| {row['level']} | {row['stage']} | {row['setting']} | {fps:.0f} | "
            f"{'; '.join(notes)} |"
        )
    out = {
        "config": str(args.config),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchrl": torchrl.__version__,
        "args": vars(args),
        "rows": rows,
    }
    path = Path(args.json or f"bench_results/throughput_{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
