import contextlib
import io
import threading
import time

import gymnasium as gym
import minigrid  # noqa: F401
import pytest
from minigrid.core.world_object import Box
from minigrid.utils.baby_ai_bot import BabyAIBot

from mop_torchrl.babyai.bot import (
    BabyAIExpert,
    BotBudgetExceeded,
    BoundedBabyAIBot,
    bot_solution_length,
)


def _reset(level: str, seed: int):
    env = gym.make(level)
    with contextlib.redirect_stdout(io.StringIO()):
        env.reset(seed=seed)
    return env


def _bot_rollout(env, bot, max_steps=1000):
    actions = [bot.replan()]
    for _ in range(max_steps):
        _, reward, terminated, truncated, _ = env.step(actions[-1])
        if terminated or truncated:
            return actions, reward
        actions.append(bot.replan(actions[-1]))
    raise AssertionError("no end")


@pytest.mark.parametrize("level", ["BabyAI-GoToLocal-v0", "BabyAI-PutNextLocal-v0"])
def test_bounded_bot_matches_minigrid_bot(level):
    for seed in range(3):
        env = _reset(level, seed)
        ref_actions, ref_reward = _bot_rollout(env, BabyAIBot(env))
        env = _reset(level, seed)
        actions, reward = _bot_rollout(env, BoundedBabyAIBot(env))
        assert actions == ref_actions
        assert reward == ref_reward > 0


def test_iteration_budget_raises():
    env = _reset("BabyAI-GoToLocal-v0", 0)
    bot = BoundedBabyAIBot(env, max_iterations=0)
    with pytest.raises(BotBudgetExceeded):
        bot.replan()


def test_time_budget_raises():
    env = _reset("BabyAI-GoToLocal-v0", 0)
    bot = BoundedBabyAIBot(env, max_iterations=None, max_seconds=-1.0)
    with pytest.raises(BotBudgetExceeded, match=r"exceeded -1\.0 s"):
        bot.replan()


def test_expert_failure_counts_and_recovers():
    env = _reset("BabyAI-GoToLocal-v0", 1)
    expert = BabyAIExpert(env, max_iterations=0)
    assert expert.reset() == -1
    assert expert.failures == 1 and "BotBudgetExceeded" in expert.last_error
    env.step(0)
    assert expert.replan(0) == -1
    assert expert.failures == 2
    # budget restored: the next step plans with a fresh bot and gives a real label
    expert.max_iterations = 100
    env.step(1)
    label = expert.replan(1)
    assert 0 <= label < 7
    assert expert.failures == 2 and expert.total_failures == 2
    # a new episode resets the per-episode count, not the total
    with contextlib.redirect_stdout(io.StringIO()):
        env.reset(seed=2)
    assert 0 <= expert.reset() < 7
    assert expert.failures == 0 and expert.total_failures == 2


def test_looping_bot_is_stopped():
    # On this Unlock episode the minigrid bot enters an endless subgoal loop after ~160 steps.
    env = _reset("BabyAI-Unlock-v0", 63)
    expert = BabyAIExpert(env)
    label = expert.reset()
    worst = 0.0
    for _ in range(env.unwrapped.max_steps):
        assert label != -1
        _, _, terminated, truncated, _ = env.step(label)
        assert not (terminated or truncated)
        t0 = time.perf_counter()
        label = expert.replan(label)
        worst = max(worst, time.perf_counter() - t0)
        if label == -1:
            break
    assert label == -1 and expert.failures == 1
    assert "BotBudgetExceeded" in expert.last_error
    assert worst < 10.0
    # the env keeps going and labels resume with a fresh bot
    env.step(0)
    label = expert.replan(0)
    assert label in range(7) or (label == -1 and expert.failures == 2)


def test_budget_works_outside_main_thread():
    result = {}

    def work():
        env = _reset("BabyAI-GoToLocal-v0", 0)
        expert = BabyAIExpert(env, max_iterations=0)
        result["label"] = expert.reset()
        result["failures"] = expert.failures

    th = threading.Thread(target=work)
    th.start()
    th.join(timeout=30)
    assert not th.is_alive()
    assert result == {"label": -1, "failures": 1}


def test_box_opening_is_a_failure_not_a_crash():
    # toggling a box makes minigrid's bot raise DisappearedBoxError; the expert returns -1
    env = _reset("BabyAI-GoToLocal-v0", 0)
    expert = BabyAIExpert(env)
    assert expert.reset() != -1
    uw = env.unwrapped
    fwd = uw.front_pos
    assert uw.grid.get(*fwd) is None
    uw.grid.set(*fwd, Box("red"))
    assert expert.replan(uw.actions.done) != -1  # "done" changes nothing; the bot sees the box
    env.step(uw.actions.toggle)  # the empty box disappears
    assert uw.grid.get(*fwd) is None
    assert expert.replan(uw.actions.toggle) == -1
    assert "DisappearedBoxError" in expert.last_error
    env.step(uw.actions.left)
    assert expert.replan(uw.actions.left) in range(7)  # fresh bot, labels recover


def test_solution_length_matches_bot_rollout_and_leaves_env_untouched():
    for seed in range(3):
        env = _reset("BabyAI-GoToRedBall-v0", seed)
        pos, dir_, steps = tuple(env.unwrapped.agent_pos), env.unwrapped.agent_dir, 0
        n = bot_solution_length(env)
        assert (tuple(env.unwrapped.agent_pos), env.unwrapped.agent_dir) == (pos, dir_)
        assert env.unwrapped.step_count == steps
        actions, reward = _bot_rollout(env, BabyAIBot(env))
        assert reward > 0 and n == len(actions)


def test_solution_length_failure_is_minus_one():
    env = _reset("BabyAI-GoToRedBall-v0", 0)
    assert bot_solution_length(env, max_iterations=0) == -1
    assert bot_solution_length(env, max_steps=1) == -1


def test_fresh_bot_skips_completed_parts_of_a_sequence():
    env = _reset("BabyAI-OpenRedBlueDoors-v0", 0)
    instrs = env.unwrapped.instrs
    bot = BabyAIBot(env)
    action = bot.replan()
    while instrs.a_done != "success":
        _, _, terminated, _, _ = env.step(action)
        assert not terminated
        action = bot.replan(action)
    full = BabyAIBot(env)  # plans the whole mission again
    fresh = BoundedBabyAIBot(env)  # plans only what is left
    assert len(fresh.stack) < len(full.stack)
    _, reward = _bot_rollout(env, fresh)
    assert reward > 0


def test_exceptions_are_counted_by_type_not_as_budget_failures(monkeypatch, caplog):
    from mop_torchrl.babyai import bot as expert_module

    def buggy_replan(self, action_taken=None):
        raise TypeError("a bug, not a plan failure")

    monkeypatch.setattr(expert_module, "_logged_types", set())
    monkeypatch.setattr(BoundedBabyAIBot, "replan", buggy_replan)
    env = _reset("BabyAI-GoToLocal-v0", 0)
    expert = BabyAIExpert(env)
    with caplog.at_level("WARNING", logger="mop_torchrl.babyai.bot"):
        assert expert.reset() == -1 and expert.replan(2) == -1
        assert bot_solution_length(env, errors=expert.errors) == -1
    assert expert.failures == 0 and expert.total_failures == 0
    assert dict(expert.errors.counts) == {"TypeError": 3}
    logged = [r for r in caplog.records if "TypeError" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None  # the first one, with traceback
