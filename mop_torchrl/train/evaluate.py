"""Greedy evaluation of a policy on held-out BabyAI episodes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tensordict.nn import InteractionType
from torch import nn
from torchrl.collectors import Collector

from mop_torchrl.envs import make_babyai_env
from mop_torchrl.module import MoPModule
from mop_torchrl.train.checkpoint import CheckpointError, load_checkpoint
from mop_torchrl.train.config import TrainConfig
from mop_torchrl.train.run import build_policy, load_modules

__all__ = ["EVAL_SEED_OFFSET", "evaluate", "evaluate_checkpoint", "load_actor"]

EVAL_SEED_OFFSET = 1_000_003
"""Evaluation seeds are ``seed + EVAL_SEED_OFFSET``, away from the training envs' seeds."""


def load_actor(checkpoint: str | Path) -> tuple[nn.Module, TrainConfig]:
    """The actor saved in a training checkpoint, in eval mode, and its config."""
    payload = load_checkpoint(checkpoint)
    config = TrainConfig.from_dict(payload["config"])
    actor, _ = build_policy(config)
    load_modules(payload, {"actor": actor}, Path(checkpoint))
    return actor.eval(), config


@torch.no_grad()
def evaluate(
    actor: nn.Module,
    task_id: str,
    episodes: int = 100,
    seed: int = 0,
    num_envs: int = 8,
    parallel: bool = False,
) -> dict[str, Any]:
    """Runs ``episodes`` greedy episodes and reports BabyAI's metrics.

    Each env contributes its first ``episodes / num_envs`` episodes (rounded up, then the first
    ``episodes`` kept in env order), so short episodes are not over-counted. Metrics: success
    rate, mean return and length, path ratio (agent steps over the bot's steps from the same
    start, successful episodes; ``None`` when none succeeded), mean routing cost per step
    (MoP), bot plan failures (exhausted budget) and other bot exceptions (``bot_errors``).

    Examples:
        >>> from mop_torchrl.policies import make_policy
        >>> actor, _ = make_policy("mop")
        >>> result = evaluate(actor.eval(), "GoToRedBall", episodes=2, num_envs=2)
        >>> sorted(result)[:3]
        ['bot_errors', 'bot_failures', 'episodes']
    """
    if episodes < 1 or num_envs < 1:
        raise ValueError(f"episodes and num_envs must be >= 1, got {episodes}, {num_envs}")
    num_envs = min(num_envs, episodes)
    per_env = -(-episodes // num_envs)
    env = make_babyai_env(
        task_id,
        num_envs=num_envs,
        seed=seed + EVAL_SEED_OFFSET,
        expert=True,
        path_ratio=True,
        parallel=parallel,
    )
    collector = Collector(
        env,
        actor,
        frames_per_batch=num_envs * 64,
        total_frames=-1,
        exploration_type=InteractionType.DETERMINISTIC,
        auto_register_policy_transforms=True,
    )
    finished: list[list[dict[str, float]]] = [[] for _ in range(num_envs)]
    costs, frames, start = [], 0, time.perf_counter()
    try:
        for data in collector:
            data = data.reshape(num_envs, -1)
            frames += data.numel()
            if ("routing", "cost") in data.keys(True):
                costs.append(data["routing", "cost"].mean().item())
            nxt = data["next"]
            for i in range(num_envs):
                for t in torch.nonzero(nxt["done"][i].reshape(-1)).reshape(-1).tolist():
                    step = nxt[i, t]
                    finished[i].append(
                        {
                            "success": float(step["success"].item()),
                            "return": step["episode_reward"].item(),
                            "length": step["step_count"].item(),
                            "bot_length": step["bot_solution_length"].item(),
                            "bot_failures": step["bot_failures"].item(),
                            "bot_errors": step["bot_errors"].item(),
                        }
                    )
            if all(len(f) >= per_env for f in finished):
                break
    finally:
        collector.shutdown()
    kept = [e for env_episodes in finished for e in env_episodes[:per_env]][:episodes]
    solved = [e for e in kept if e["success"] and e["bot_length"] > 0]
    mean = lambda values: sum(values) / max(len(values), 1)  # noqa: E731
    return {
        "task_id": task_id,
        "episodes": len(kept),
        "success_rate": mean([e["success"] for e in kept]),
        "mean_return": mean([e["return"] for e in kept]),
        "mean_length": mean([e["length"] for e in kept]),
        "path_ratio": mean([e["length"] / e["bot_length"] for e in solved]) if solved else None,
        "routing_cost": mean(costs) if costs else None,
        "bot_failures": sum(e["bot_failures"] for e in kept),
        "bot_errors": sum(e["bot_errors"] for e in kept),
        "frames": frames,
        "wall_s": time.perf_counter() - start,
    }


def evaluate_checkpoint(
    checkpoint: str | Path,
    episodes: int = 100,
    seed: int = 0,
    num_envs: int = 8,
    task_id: str | None = None,
    weight_threshold: float = 0.0,
    disable_largest: bool = False,
) -> dict[str, Any]:
    """:func:`evaluate` on a checkpoint, with the MoP ablation knobs."""
    actor, config = load_actor(checkpoint)
    cores = [m for m in actor.modules() if isinstance(m, MoPModule)]
    if (weight_threshold or disable_largest) and not cores:
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r} holds a {config.policy!r} policy: "
            "--threshold/--disable-largest apply to MoP policies only"
        )
    for core in cores:
        core.set_inference_knobs(weight_threshold=weight_threshold, disable_largest=disable_largest)
    result = evaluate(actor, task_id or config.task_id, episodes, seed, num_envs)
    result.update(
        {
            "checkpoint": str(checkpoint),
            "policy": config.policy,
            "weight_threshold": weight_threshold,
            "disable_largest": disable_largest,
        }
    )
    return result
