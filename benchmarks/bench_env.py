"""BabyAI env throughput: bare gymnasium vs the mop_torchrl wrapper, with and without the bot.

Random actions, env steps per second (a batched step of N envs counts N), construction and
worker start-up excluded. Short by default; numbers on a shared machine are noisy, compare
rows of one run only.

    python benchmarks/bench_env.py --level BabyAI-GoToLocal-v0 --steps 2000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import gymnasium as gym
import minigrid
import numpy as np
import torch
import torchrl

from mop_torchrl.babyai.envs import make_babyai_env, make_babyai_gym_env
from mop_torchrl.babyai.levels import resolve_level


def _gym_loop(env: gym.Env, steps: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    actions = rng.integers(0, 7, size=steps)
    t0 = time.perf_counter()
    for a in actions:
        _, _, terminated, truncated, _ = env.step(int(a))
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - t0)


def _torchrl_loop(env, steps: int) -> float:
    n = max(1, env.batch_size.numel())
    env.rollout(8, break_when_any_done=False)  # start workers, warm caches
    t0 = time.perf_counter()
    env.rollout(max(1, steps // n), break_when_any_done=False)
    rate = (steps // n) * n / (time.perf_counter() - t0)
    env.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--level", default="BabyAI-GoToLocal-v0")
    parser.add_argument("--steps", type=int, default=2000, help="env steps per row")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    level = resolve_level(args.level)
    torch.manual_seed(0)

    rows: list[tuple[str, float]] = []

    def add(name: str, rate: float) -> None:
        rows.append((name, rate))
        print(f"{name:<36s} {rate:10.0f} steps/s", flush=True)

    add("gymnasium bare", _gym_loop(gym.make(level), args.steps))
    add("gymnasium + BabyAIObservation", _gym_loop(make_babyai_gym_env(level), args.steps))
    add(
        "gymnasium + BabyAIObservation expert",
        _gym_loop(make_babyai_gym_env(level, expert=True), args.steps),
    )
    for expert in (False, True):
        tag = " expert" if expert else ""
        add(
            f"torchrl single{tag}", _torchrl_loop(make_babyai_env(level, expert=expert), args.steps)
        )
        for parallel in (False, True):
            kind = "ParallelEnv" if parallel else "SerialEnv"
            env = make_babyai_env(level, args.workers, expert=expert, parallel=parallel)
            add(f"torchrl {kind}({args.workers}){tag}", _torchrl_loop(env, args.steps))

    if args.json:
        out = {
            "benchmark": "bench_env",
            "level": level,
            "steps": args.steps,
            "workers": args.workers,
            "machine": platform.platform(),
            "cpu_count": os.cpu_count(),
            "versions": {
                "torch": torch.__version__,
                "torchrl": torchrl.__version__,
                "gymnasium": gym.__version__,
                "minigrid": getattr(minigrid, "__version__", "unknown"),
            },
            "steps_per_s": dict(rows),
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
