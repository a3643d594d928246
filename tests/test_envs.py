import numpy as np
import pytest
import torch
from minigrid.minigrid_env import MiniGridEnv
from minigrid.utils.baby_ai_bot import BabyAIBot
from torchrl.envs import ParallelEnv
from torchrl.envs.utils import check_env_specs

from mop_torchrl.babyai.batched import BabyAIBatchedEnv
from mop_torchrl.babyai.bot import BoundedBabyAIBot
from mop_torchrl.babyai.envs import make_babyai_env, worker_seeds
from mop_torchrl.babyai.levels import babyai_levels, resolve_level
from mop_torchrl.babyai.tokenizer import MAX_MISSION_TOKENS, MissionTokenizer
from mop_torchrl.babyai.view import agent_view
from mop_torchrl.babyai.wrappers import make_babyai_gym_env

LEVEL = "BabyAI-GoToLocal-v0"


def test_levels_and_short_names():
    levels = babyai_levels()
    assert len(levels) >= 90 and all(lv.startswith("BabyAI-") for lv in levels)
    assert LEVEL in levels
    assert resolve_level("GoToRedBall") == "BabyAI-GoToRedBall-v0"
    assert resolve_level("BabyAI-GoToLocal") == LEVEL
    assert resolve_level(LEVEL) == LEVEL


def test_unknown_level_lists_near_matches():
    with pytest.raises(ValueError, match=r"Near matches:.*BabyAI-GoToRedBall-v0"):
        make_babyai_env("GoToRedBal")
    with pytest.raises(ValueError, match=r"BabyAI-PutNextLocal-v0"):
        make_babyai_env("BabyAI-PutNxtLocal-v0")


def test_worker_seeds():
    s = worker_seeds(7, 4)
    assert len(set(s)) == 4
    assert worker_seeds(7, 4) == s and worker_seeds(7, 2) == s[:2]
    assert not set(worker_seeds(8, 4)) & set(s)


def test_single_env_specs_and_keys():
    env = make_babyai_env("GoToLocal", seed=3, expert=True, path_ratio=True)
    try:
        check_env_specs(env)
        td = env.rollout(80, break_when_any_done=False)
    finally:
        env.close()
    assert td["image"].dtype == torch.uint8 and td["image"].shape == (80, 7, 7, 3)
    assert td["mission"].dtype == torch.int64 and td["mission"].shape == (80, MAX_MISSION_TOKENS)
    assert td["direction"].shape == td["carrying"].shape == (80,)
    assert td["expert_action"].shape == td["action"].shape == (80,)
    assert td["expert_action"].dtype == td["action"].dtype == torch.int64
    for key in ("is_init", "step_count", "episode_reward"):
        assert key in td.keys(True)
    for key in ("success", "bot_failures", "bot_solution_length"):
        assert ("next", key) in td.keys(True)
    assert td["is_init"][0].all()
    tok = MissionTokenizer()
    assert tok.decode(td["mission"][0]).startswith("go to ")
    # GoToLocal ends at 64 steps: an 80-step rollout crosses an episode boundary
    assert td["next", "done"].any()
    assert (td["bot_solution_length"] > 0).all()


def test_in_process_env_seeding_is_deterministic_and_distinct():
    def first_obs(seed):
        env = make_babyai_env(LEVEL, num_envs=3, seed=seed, parallel=False)
        try:
            assert isinstance(env.base_env, BabyAIBatchedEnv)
            return env.reset()
        finally:
            env.close()

    a, b, c = first_obs(0), first_obs(0), first_obs(1)
    assert (a["image"] == b["image"]).all() and (a["mission"] == b["mission"]).all()
    # distinct workers and seeds see distinct episodes (the image is all but surely different)
    assert len({bytes(x.numpy()) for x in a["image"]}) == 3
    assert not (a["image"] == c["image"]).all()


def test_serial_env_specs():
    env = make_babyai_env(LEVEL, num_envs=2, expert=True, parallel=False)
    try:
        check_env_specs(env)
    finally:
        env.close()


def _replay_reference(level, seed, actions, obs_td):
    """Replay ``actions`` on an identical gymnasium env and a fresh minigrid bot.

    Returns the bot's label for every step's observation, with the same convention as the
    env (a bot exception gives -1 and a new bot from the next step on), and checks that the
    replayed observations match the recorded ones.
    """
    genv = make_babyai_gym_env(level, seed=seed)  # no expert: a plain replay
    tok = MissionTokenizer()

    def fresh():
        b = BabyAIBot(genv)
        return b, b.replan()

    obs, _ = genv.reset()
    bot, label = fresh()
    labels, n_steps_in_episode = [], []
    t_in_ep = 0
    for t, a in enumerate(actions):
        assert np.array_equal(obs["image"], obs_td["image"][t].numpy()), t
        assert tok.decode(obs["mission"]) == tok.decode(obs_td["mission"][t]), t
        labels.append(label)
        n_steps_in_episode.append(t_in_ep)
        obs, _, terminated, truncated, _ = genv.step(a)
        assert bool(obs_td["next", "done"][t]) == (terminated or truncated), t
        if terminated or truncated:
            obs, _ = genv.reset()
            bot, label = fresh()
            t_in_ep = 0
            continue
        t_in_ep += 1
        try:
            if bot is None:
                bot, label = fresh()
            else:
                label = int(bot.replan(a))
        except Exception:
            bot, label = None, -1
    return labels, n_steps_in_episode


@pytest.mark.subprocess
@pytest.mark.slow
def test_parallel_expert_action_matches_replayed_bot():
    """Random student, 2 worker processes: every label equals an independent replay's.

    The first label of an episode is a fresh bot on the reset state; later labels come from a
    minigrid BabyAIBot replayed with the same action history on an identically seeded env,
    so this checks seeding, the replan protocol (the action actually taken) and the
    label/observation alignment inside ParallelEnv.
    """
    seed, steps = 11, 150
    env = make_babyai_env(LEVEL, num_envs=2, seed=seed, expert=True, parallel=True)
    try:
        assert isinstance(env.base_env, ParallelEnv)
        torch.manual_seed(0)
        td = env.rollout(steps, break_when_any_done=False)
        compared_late = 0
        for i, s in enumerate(worker_seeds(seed, 2)):
            actions = td["action"][i].tolist()
            labels, t_in_ep = _replay_reference(LEVEL, s, actions, td[i])
            assert td["expert_action"][i].tolist() == labels
            compared_late += sum(t > 0 for t in t_in_ep)
            # failures (budget) + errors (exceptions, e.g. a box opened) = the -1 labels
            fails = 0
            for t in range(steps - 1):
                if t_in_ep[t] == 0:
                    fails = int(labels[t] == -1)
                if not td["next", "done"][i, t]:
                    fails += labels[t + 1] == -1
                    counted = td["next", "bot_failures"][i, t] + td["next", "bot_errors"][i, t]
                    assert int(counted) == fails
        assert compared_late > 200
        assert td["next", "done"].any()  # episodes restarted inside the rollout
        check_env_specs(env)
    finally:
        env.close()


def test_bot_failure_path_does_not_hang():
    env = make_babyai_env(LEVEL, num_envs=2, seed=0, expert=True, parallel=False, bot_budget=0)
    try:
        td = env.rollout(100, break_when_any_done=False)
    finally:
        env.close()
    assert (td["expert_action"] == -1).all()
    # one failure per labelled observation; the count restarts with each episode
    is_init, fails = td["is_init"].squeeze(-1), td["next", "bot_failures"]
    done = td["next", "done"].squeeze(-1)
    steps_in_ep = td["step_count"].squeeze(-1)
    assert (fails[~done] == steps_in_ep[~done] + 2).all()
    assert is_init.sum() > 2 and done.sum() >= 2


def test_expert_policy_succeeds_with_path_ratio_one():
    env = make_babyai_env("GoToRedBall", seed=5, expert=True, path_ratio=True)

    def follow_expert(td):
        td["action"] = td["expert_action"].clamp_min(0)
        return td

    try:
        td = env.rollout(200, follow_expert, break_when_any_done=False)
    finally:
        env.close()
    done = td["next", "done"].squeeze(-1)
    assert done.sum() >= 3
    assert td["next", "success"][done].all()
    assert (td["next", "reward"][done] > 0).all()
    assert not td["next", "success"][~done].any()
    # the bot acting from the start takes exactly its own solution length
    lengths = td["next", "step_count"][done].squeeze(-1)
    assert (lengths == td["next", "bot_solution_length"][done]).all()
    assert (td["next", "bot_failures"] == 0).all()


def test_bot_exceptions_reach_the_env_metrics_apart_from_failures(monkeypatch):
    real_replan = BoundedBabyAIBot.replan

    def flaky_replan(self, action_taken=None):
        if action_taken == 2:  # "forward": a stand-in for a bug in the bot
            raise AttributeError("flaky")
        return real_replan(self, action_taken)

    monkeypatch.setattr(BoundedBabyAIBot, "replan", flaky_replan)
    env = make_babyai_gym_env("GoToRedBall", seed=0, expert=True)
    obs, info = env.reset()
    assert info["bot_errors"] == 0
    obs, *_, info = env.step(2)
    assert obs["expert_action"] == -1 and info["bot_errors"] == 1 and info["bot_failures"] == 0
    obs, *_, info = env.step(0)
    assert obs["expert_action"] >= 0 and info["bot_errors"] == 1
    env.reset()
    assert env.step(0)[-1]["bot_errors"] == 0  # counted per episode


@pytest.mark.parametrize("level", ["GoTo", "PutNextLocal", "GoToLocal,PickupLoc"])
@pytest.mark.parametrize("see_through_walls", [False, True])
def test_agent_view_is_minigrids_view(level: str, see_through_walls: bool) -> None:
    """:func:`agent_view` returns ``gen_obs_grid``'s view: the same cell objects where it sees
    them (a wall outside the grid), the same mask and encoding, on random walks that open
    doors and carry objects."""
    env = make_babyai_gym_env(level, seed=3)
    rng = np.random.default_rng(0)
    for level_env in getattr(env.env, "envs", [env.env]):
        level_env.unwrapped.see_through_walls = see_through_walls
    env.reset()
    for _ in range(300):
        base = env.unwrapped
        grid, mask = agent_view(base)
        ref_grid, ref_mask = MiniGridEnv.gen_obs_grid(base)
        assert np.array_equal(mask, ref_mask) and mask.flags.c_contiguous
        assert np.array_equal(grid.encode(mask), ref_grid.encode(ref_mask))
        for cell, ref in zip(grid.grid, ref_grid.grid, strict=True):
            assert cell is ref or (cell.type == ref.type == "wall" and cell.color == ref.color)
        _, _, terminated, truncated, _ = env.step(int(rng.integers(0, 6)))
        if terminated or truncated:
            env.reset()


@pytest.mark.parametrize("level", ["GoTo", "PutNextLocal", "GoToLocal,PickupLoc"])
def test_view_memo_and_bot_search_change_no_observation_or_label(level: str, monkeypatch) -> None:
    """The memoised direct view (computed once per step for the observation and the bot) and
    the bot's own search and map update give the observations, labels and bot solution lengths
    of minigrid's ``gen_obs_grid`` and ``BabyAIBot``."""

    def episodes(ours: bool) -> list:
        env = make_babyai_gym_env(level, seed=2, expert=True, path_ratio=True)
        if not ours:
            for level_env in getattr(env.env, "envs", [env.env]):
                del level_env.unwrapped.gen_obs_grid
            for name in ("_breadth_first_search", "_process_obs"):
                monkeypatch.setattr(BoundedBabyAIBot, name, getattr(BabyAIBot, name))
        rng = np.random.default_rng(0)
        obs, info = env.reset()
        seen = [(obs["image"].copy(), int(obs["expert_action"]), int(info["bot_solution_length"]))]
        for _ in range(150):  # the bot's action, or a random one 30% of the time
            action = int(obs["expert_action"])
            if action < 0 or rng.random() < 0.3:
                action = int(rng.integers(0, 6))
            obs, _, terminated, truncated, info = env.step(action)
            seen.append((obs["image"].copy(), int(obs["expert_action"]), int(obs["carrying"])))
            if terminated or truncated:
                obs, info = env.reset()
                seen.append((obs["image"].copy(), int(info["bot_solution_length"])))
        return seen

    ours = episodes(True)
    plain = episodes(False)
    assert len(ours) == len(plain)
    assert sum(len(step) == 2 for step in plain) >= 1  # an episode ended inside the walk
    for got, want in zip(ours, plain, strict=True):
        assert np.array_equal(got[0], want[0]) and got[1:] == want[1:]
