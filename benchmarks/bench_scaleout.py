"""Collection throughput of the collector backends for 1, 2, 4... workers.

Frames/s of :func:`~mop_torchrl.train.collection.make_collector` batches (``num_envs ×
unroll_len`` frames, bot labels on, the config's policy acting greedily), with the learner's
weights pushed before every batch as in training. Start-up (worker processes, envs) is timed
separately and excluded from frames/s. On a shared machine the numbers are noisy: compare rows of
one run only, and read the recorded load average.

    python benchmarks/bench_scaleout.py --level BabyAI-GoToLocal-v0 --workers 1 2 4 \\
        --backends inprocess multiprocess distributed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torchrl
from tensordict.nn import InteractionType

from mop_torchrl.train import TrainConfig
from mop_torchrl.train.collection import (
    env_factories,
    make_collector,
    push_weights,
)
from mop_torchrl.train.policy import build_policy


def measure(config: TrainConfig, batches: int) -> dict[str, float]:
    """Start-up seconds and frames/s over ``batches`` batches after one warm-up batch."""
    torch.manual_seed(config.seed)
    actor = build_policy(config)[0].eval()
    create_envs = env_factories(config, expert=True, seed=config.seed)
    frames = config.num_envs * config.unroll_len
    t0 = time.perf_counter()
    collector = make_collector(
        config, actor, create_envs, frames * (batches + 1), InteractionType.DETERMINISTIC
    )
    try:
        iterator = iter(collector)
        push_weights(collector, actor, config)
        next(iterator)  # warm-up: workers up, envs reset
        startup = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(batches):
            push_weights(collector, actor, config)
            data = next(iterator)
        elapsed = time.perf_counter() - t1
    finally:
        collector.shutdown()
    assert data.numel() == frames
    return {"startup_s": startup, "frames_per_s": batches * frames / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--level", default="BabyAI-GoToLocal-v0")
    parser.add_argument("--num_envs", type=int, default=8, help="envs in all (split on workers)")
    parser.add_argument("--unroll_len", type=int, default=32)
    parser.add_argument("--batches", type=int, default=5, help="timed batches per row")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["inprocess", "multiprocess", "distributed"],
        choices=["inprocess", "multiprocess", "distributed", "ray"],
    )
    parser.add_argument("--policy", default="mop", choices=["mop", "gru"])
    parser.add_argument("--json", default=None, help="output (default: bench_results/...)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    for backend in args.backends:
        for workers in [1] if backend == "inprocess" else args.workers:
            config = TrainConfig(
                task_id=args.level,
                policy=args.policy,
                num_envs=args.num_envs,
                unroll_len=args.unroll_len,
                backend=backend,
                num_workers=workers,
                eval_episodes=0,
            )
            result = measure(config, args.batches)
            rows.append({"backend": backend, "workers": workers, **result})
            print(
                f"{backend:>12} {workers:>2} workers: {result['frames_per_s']:8.0f} frames/s "
                f"(start-up {result['startup_s']:.1f} s)",
                flush=True,
            )

    print("\n| backend | workers | frames/s | start-up (s) |\n|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['backend']} | {row['workers']} | {row['frames_per_s']:.0f} | "
            f"{row['startup_s']:.1f} |"
        )
    out = {
        "level": args.level,
        "num_envs": args.num_envs,
        "unroll_len": args.unroll_len,
        "batches": args.batches,
        "policy": args.policy,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchrl": torchrl.__version__,
        "rows": rows,
    }
    path = Path(
        args.json or f"bench_results/scaleout_{args.level}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
