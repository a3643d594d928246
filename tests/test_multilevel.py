"""Multi-level BabyAI: level mixtures, per-level training logs, eval and routes, pathway tables."""

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
from synthetic import synthetic_tables

from mop_torchrl.analysis.pathways import (
    level_summary,
    spearman_by_alpha,
    step_type,
    write_summary_csv,
)
from mop_torchrl.analysis.record import record_routes
from mop_torchrl.babyai.envs import make_babyai_env
from mop_torchrl.babyai.levels import parse_level_weights, resolve_levels
from mop_torchrl.babyai.wrappers import LevelMixture
from mop_torchrl.train import TrainConfig, train
from mop_torchrl.train.evaluate import evaluate
from mop_torchrl.train.policy import load_actor

LEVELS = ["BabyAI-GoToRedBall-v0", "BabyAI-GoToLocal-v0"]


def mixture(weights=None):
    return LevelMixture([gym.make(level) for level in LEVELS], weights)


def test_level_weights_give_the_requested_proportions():
    env = mixture([1, 3])
    draws = [int(env.reset(seed=0 if i == 0 else None)[0]["level"]) for i in range(600)]
    share = np.mean(draws)
    # binomial(600, 0.75): standard deviation 0.018, so +-0.06 is over 3 sigma
    assert abs(share - 0.75) < 0.06, share


def test_level_mixture_is_seeded_and_episodes_follow_their_level():
    first, second = mixture(), mixture()
    seq = []
    for env in (first, second):
        levels, missions = [], []
        for i in range(12):
            obs, _ = env.reset(seed=5 if i == 0 else None)
            levels.append(int(obs["level"]))
            missions.append(obs["mission"])
            assert env.unwrapped is env.envs[levels[-1]].unwrapped
            assert env.unwrapped.max_steps == env.envs[levels[-1]].unwrapped.max_steps
        seq.append((levels, missions))
    assert seq[0] == seq[1]
    assert set(seq[0][0]) == {0, 1}


def test_batched_multilevel_env_carries_the_level_and_bot_labels():
    env = make_babyai_env(",".join(LEVELS), num_envs=4, expert=True, parallel=False, seed=1)
    data = env.rollout(70, break_when_any_done=False)
    env.close()
    assert data["level"].shape == data["action"].shape
    assert set(data["level"].unique().tolist()) == {0, 1}
    # each episode keeps one level; the level changes only across a reset
    same = data["level"][:, 1:] == data["level"][:, :-1]
    assert bool((same | data["is_init"][:, 1:].squeeze(-1)).all())
    assert (data["expert_action"] >= 0).float().mean() > 0.95
    single = make_babyai_env("GoToRedBall", num_envs=1)
    assert "level" not in single.reset()  # single-level envs are unchanged


@pytest.mark.parametrize(
    "levels, weights, match",
    [
        ("GoToRedBall,GoToLocl", None, "GoToLocal"),
        ("GoToRedBall,GoToRedBall", None, "more than once"),
        ("GoToRedBall,GoToLocal", "1,2,3", "3 level weights given for 2 levels"),
        ("GoToRedBall,GoToLocal", "1,-1", "positive"),
    ],
)
def test_bad_levels_and_weights_are_refused_naming_the_problem(tmp_path, levels, weights, match):
    # An unknown level is a RunError when the run starts; bad weights are a ConfigError as the
    # config is built (both ValueErrors, exit codes 1 and 2): either way nothing is written.
    with pytest.raises(ValueError, match=match):
        train(TrainConfig(task_id=levels, level_weights=weights, run_dir=str(tmp_path)))
    assert not any(tmp_path.iterdir())


def test_yaml_lists_become_level_strings():
    config = TrainConfig.from_dict(
        {"task_id": ["GoToRedBall", "GoToLocal"], "level_weights": [1, 2]}
    )
    assert config.levels == ["GoToRedBall", "GoToLocal"] and config.level_weights == "1,2"
    assert config.name == "imitation-mop-2levels-s0"
    assert resolve_levels(config.task_id) == LEVELS
    assert parse_level_weights(config.level_weights, 2) == pytest.approx([1 / 3, 2 / 3])


@pytest.mark.slow
def test_two_level_training_logs_per_level_and_routes_record_both(tiny_config):
    config = tiny_config(
        task_id=",".join(LEVELS),
        num_envs=4,
        unroll_len=16,
        num_updates=4,
        buffer_frames=128,
        batch_slices=4,
        log_interval=2,
        eval_interval=4,
        eval_interval_episodes=2,
        eval_episodes=2,
    )
    run_dir = train(config)
    scalars = run_dir / "logs" / "scalars"
    for name in ("GoToRedBall", "GoToLocal"):
        for metric in ("eval/{}/success_rate", "eval/{}/routing_cost", "routing/{}/cost"):
            path = scalars / f"{metric.format(name)}.csv"
            assert path.exists(), path
    episode_logs = {p.parent.name for p in (scalars / "episode").glob("*/success.csv")}
    assert episode_logs <= {"GoToRedBall", "GoToLocal"} and episode_logs
    actor, loaded = load_actor(run_dir / "checkpoint.pt")
    assert loaded.levels == LEVELS
    result = evaluate(actor, loaded.task_id, episodes=2, num_envs=2)
    assert sorted(result["levels"]) == ["GoToLocal", "GoToRedBall"]
    per_level = [r["success_rate"] for r in result["levels"].values()]
    assert result["success_rate"] == pytest.approx(np.mean(per_level))
    routes, episodes = record_routes(actor, loaded.task_id, episodes=2, max_steps=6)
    assert sorted(routes["level"].unique()) == sorted(LEVELS)
    assert episodes["episode"].is_unique and len(episodes) == 4
    summary = level_summary(routes, alpha=config.alpha)
    assert list(summary["level"]) == ["GoToRedBall", "GoToLocal"]


def test_pathway_summary_is_validated_when_written(tmp_path):
    layers = [[0, 16, 32], [32, 64]]
    levels = ("BabyAI-GoToRedBall-v0", "BabyAI-GoToLocal-v0", "BabyAI-PickupLoc-v0")
    routes, _ = synthetic_tables(layers, levels=levels, episodes_per_level=2, seed=0)
    good = pd.concat([level_summary(routes, 0.0), level_summary(routes, 0.1)], ignore_index=True)
    path = write_summary_csv(good, tmp_path / "summary.csv")
    assert list(pd.read_csv(path).columns[:4]) == ["level", "alpha", "success", "cost_per_step"]
    broken = {
        "lacks columns": good.drop(columns="cost_per_step"),
        "no agreed difficulty": good.assign(level="BossLevel"),
        "'success' must lie": good.assign(success=1.5),
        "'cost_per_step' must be finite": good.assign(cost_per_step=float("nan")),
        "repeats": pd.concat([good, good.iloc[:1]]),
    }
    for match, frame in broken.items():
        with pytest.raises(ValueError, match=match):
            write_summary_csv(frame, tmp_path / "bad.csv")
    assert not (tmp_path / "bad.csv").exists()


def test_spearman_and_step_types_on_a_known_table():
    summary = pd.DataFrame(
        {
            "level": ["GoToRedBallNoDists", "GoToRedBall", "GoToLocal", "PickupLoc"],
            "alpha": 0.01,
            "success": 1.0,
            "cost_per_step": [0.1, 0.2, 0.3, 0.25],
            "difficulty": [1, 2, 3, 4],
            "episodes": 5,
            "steps": 50,
        }
    )
    rho = spearman_by_alpha(summary)
    assert rho["spearman_rho"].item() == pytest.approx(0.8)
    routes = pd.DataFrame(
        {
            "action": [0, 2, 3, 2, 1],
            "step": [0, 1, 2, 3, 4],
            "episode_length": 5,
            "success": [1, 1, 1, 1, 1],
        }
    )
    assert list(step_type(routes)) == [
        "first step",
        "forward",
        "final approach",
        *["final approach"] * 2,
    ]
