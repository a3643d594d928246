"""Greedy evaluation of a policy on held-out BabyAI episodes, and a probe of mission grounding.

Success alone can hide a policy that ignores the instruction (a mission-agnostic "visit the
objects" policy solves GoToLocal 40-55% of the time). :func:`grounding_probe` measures whether
the policy reads the mission: its label accuracy on bot-driven held-out episodes with the true
missions, and with each episode's mission swapped for another episode's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
from tensordict import TensorDictBase
from tensordict.nn import InteractionType, set_interaction_type
from torch import nn
from torchrl.collectors import Collector
from torchrl.modules import set_recurrent_mode

from mop_torchrl.babyai.bot import BotActor
from mop_torchrl.babyai.envs import keep_num_threads, make_babyai_env
from mop_torchrl.babyai.levels import level_name, resolve_levels
from mop_torchrl.core.module import MoPModule
from mop_torchrl.train.checkpoint import CheckpointError
from mop_torchrl.train.policy import load_actor

__all__ = [
    "EVAL_SEED_OFFSET",
    "bot_episodes",
    "evaluate",
    "evaluate_checkpoint",
    "grounding_probe",
]

EVAL_SEED_OFFSET = 1_000_003
"""Evaluation seeds are ``seed + EVAL_SEED_OFFSET``, away from the training envs' seeds."""
PROBE_SEED_OFFSET = 2_000_003
"""The grounding probe's bot episodes use ``seed + PROBE_SEED_OFFSET``."""


@torch.no_grad()
def evaluate(
    actor: nn.Module,
    task_id: str | list[str],
    episodes: int = 100,
    seed: int = 0,
    num_envs: int = 8,
    parallel: bool = False,
    sample: bool = False,
) -> dict[str, Any]:
    """Runs ``episodes`` greedy episodes and reports BabyAI's metrics.

    Greedy (the most probable action) is how BabyAI validates its imitation policies; with
    ``sample=True`` the actions are drawn from the policy's distribution instead (seeded by
    ``seed``), which shows how many failures are greedy loops.

    Several levels (``"GoToRedBall,GoToLocal"`` or a list) are evaluated one after the other,
    ``episodes`` each: ``result["levels"]`` maps each level's short name to its own result,
    and the top-level rates, returns, path ratio and routing cost are the means over levels
    (each level counts once, whatever its episode lengths).

    Each env contributes its first ``episodes / num_envs`` episodes (rounded up, then the first
    ``episodes`` kept in env order), so short episodes are not over-counted. Metrics: success
    rate, mean return and length, path ratio (agent steps over the bot's steps from the same
    start, successful episodes; ``None`` when none succeeded), mean routing cost per step
    (MoP), bot plan failures (exhausted budget) and other bot exceptions (``bot_errors``).

    Examples:
        >>> from mop_torchrl.babyai.policy import make_policy
        >>> actor, _ = make_policy("mop")
        >>> result = evaluate(actor.eval(), "GoToRedBall", episodes=2, num_envs=2)
        >>> sorted(result)[:3]
        ['bot_errors', 'bot_failures', 'episodes']
    """
    if episodes < 1 or num_envs < 1:
        raise ValueError(f"episodes and num_envs must be >= 1, got {episodes}, {num_envs}")
    levels = resolve_levels(task_id)

    def run(level: str) -> dict[str, Any]:
        # Sampled actions come from a generator seeded by the eval seed, the same for every
        # level; torch's own stream is left as it was.
        with torch.random.fork_rng(devices=[], enabled=sample):
            if sample:
                torch.manual_seed(seed + EVAL_SEED_OFFSET)
            return _evaluate_level(actor, level, episodes, seed, num_envs, parallel, sample)

    if len(levels) == 1:
        return run(levels[0])
    results = {level_name(level): run(level) for level in levels}
    return {"task_id": ",".join(levels), **_mean_over_levels(results), "levels": results}


def _mean_over_levels(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("success_rate", "mean_return", "mean_length", "path_ratio", "routing_cost"):
        values = [r[key] for r in results.values() if r[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    for key in ("episodes", "bot_failures", "bot_errors", "frames", "wall_s"):
        out[key] = sum(r[key] for r in results.values())
    return out


def _evaluate_level(
    actor: nn.Module,
    task_id: str,
    episodes: int,
    seed: int,
    num_envs: int,
    parallel: bool,
    sample: bool,
) -> dict[str, Any]:
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
        exploration_type=InteractionType.RANDOM if sample else InteractionType.DETERMINISTIC,
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
        with keep_num_threads():
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
    probe_episodes: int = 64,
    sample: bool = False,
) -> dict[str, Any]:
    """:func:`evaluate` on a checkpoint, with the MoP ablation knobs, and the
    :func:`grounding_probe` on ``probe_episodes`` bot episodes (0 skips it).

    The arguments are checked before anything runs (``ValueError``)."""
    from mop_torchrl.train.config import MAX_SEED

    if probe_episodes < 0:
        raise ValueError(f"probe_episodes must be >= 0, got {probe_episodes}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}], got {seed}")
    actor, config = load_actor(checkpoint)
    cores = [m for m in actor.modules() if isinstance(m, MoPModule)]
    if (weight_threshold or disable_largest) and not cores:
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r} holds a {config.policy!r} policy: "
            "--threshold/--disable_largest apply to MoP policies only"
        )
    for core in cores:
        core.set_inference_knobs(weight_threshold=weight_threshold, disable_largest=disable_largest)
    result = evaluate(actor, task_id or config.task_id, episodes, seed, num_envs, sample=sample)
    if probe_episodes:
        probe = bot_episodes(task_id or config.task_id, probe_episodes, seed)
        result.update(grounding_probe(actor, probe))
    result.update(
        {
            "checkpoint": str(checkpoint),
            "policy": config.policy,
            "weight_threshold": weight_threshold,
            "disable_largest": disable_largest,
            "sampled_actions": sample,
        }
    )
    return result


@torch.no_grad()
def bot_episodes(task_id: str | list[str], episodes: int = 64, seed: int = 0) -> TensorDictBase:
    """``episodes`` held-out episodes driven by the bot, one per row: ``[episodes, T]``, ``T``
    the longest episode's length.

    ``"mask"`` is ``True`` on each row's first episode (steps after it ends are padding);
    ``expert_action`` holds the bot's labels, ``is_init`` is ``True`` at ``t = 0``. Levels whose
    ``max_steps`` varies by mission (BossLevel) are cut at the first episode's. With several
    levels each row draws its own (``"level"``) and rows last the longest level's ``max_steps``.

    Examples:
        >>> data = bot_episodes("GoToRedBall", episodes=2)
        >>> data.shape[0], bool(data["mask"][:, 0].all()), bool(data["is_init"][:, 0].all())
        (2, True, True)
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    levels = resolve_levels(task_id)
    max_steps = 0
    for level in levels:
        sizer = gym.make(level).unwrapped
        sizer.reset(seed=seed)  # levels set max_steps when they generate a mission
        max_steps = max(max_steps, sizer.max_steps)
    env = make_babyai_env(
        levels, num_envs=episodes, seed=seed + PROBE_SEED_OFFSET, expert=True, parallel=False
    )
    try:
        data = env.rollout(max_steps, BotActor(seed), break_when_any_done=False)
    finally:
        with keep_num_threads():
            env.close()
    if data.batch_dims == 1:  # one episode: the env is unbatched
        data = data.unsqueeze(0)
    done = data["next", "done"].squeeze(-1).long()
    data["mask"] = (done.cumsum(-1) - done) == 0
    # Only padding lies after the longest first episode: the probe need not replay it.
    return data[:, : int(data["mask"].sum(-1).max())]


@torch.no_grad()
def grounding_probe(actor: nn.Module, episodes: TensorDictBase) -> dict[str, float]:
    """Label accuracy of the greedy ``actor`` on :func:`bot_episodes`, true vs shuffled missions.

    The actor replays each episode in recurrent mode from a zero state; its greedy ``action`` is
    compared with the bot's label on every valid step. In the shuffled run, episode ``i`` carries
    episode ``i - 1``'s mission. A policy that reads the mission loses accuracy there
    (``grounding_gap`` > 0); one that ignores it does not.

    Examples:
        >>> from mop_torchrl.babyai.policy import make_policy
        >>> actor, _ = make_policy("gru")
        >>> probe = grounding_probe(actor.eval(), bot_episodes("GoToRedBall", episodes=2))
        >>> sorted(probe)
        ['grounding_gap', 'label_accuracy', 'label_accuracy_shuffled']
    """
    data = episodes.select("image", "direction", "carrying", "mission", "is_init")
    shuffled = data.clone()
    shuffled["mission"] = data["mission"][:, :1].roll(1, 0).expand_as(data["mission"]).clone()
    labels = episodes["expert_action"]
    valid = episodes["mask"] & (labels >= 0)
    accuracy = {}
    for name, inputs in (("label_accuracy", data), ("label_accuracy_shuffled", shuffled)):
        with set_recurrent_mode(True), set_interaction_type(InteractionType.DETERMINISTIC):
            actions = actor(inputs.copy())["action"]
        accuracy[name] = (actions == labels)[valid].float().mean().item()
    accuracy["grounding_gap"] = accuracy["label_accuracy"] - accuracy["label_accuracy_shuffled"]
    return accuracy
