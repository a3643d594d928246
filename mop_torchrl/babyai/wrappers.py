"""Gymnasium wrappers that make BabyAI envs fixed-size and bot-labelled (no TorchRL here).

:class:`BabyAIObservation` turns the minigrid observation into fixed-size integer arrays (the
mission tokenised with :class:`~mop_torchrl.babyai.tokenizer.MissionTokenizer`), optionally
labels every observation with the BabyAI bot's action, and puts episode metrics in the step
``info``. :class:`LevelMixture` puts several levels behind one env. :func:`make_babyai_gym_env`
builds the wrapped env; the demo workers and the route recorder step it in plain gymnasium
loops, and :func:`~mop_torchrl.babyai.envs.make_babyai_env` wraps it for TorchRL.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import minigrid  # noqa: F401  (registers the BabyAI-* ids)
import numpy as np
from gymnasium import spaces
from minigrid.minigrid_env import MiniGridEnv

from mop_torchrl.babyai.bot import (
    DEFAULT_BOT_BUDGET,
    BabyAIExpert,
    BotErrors,
    bot_solution_length,
)
from mop_torchrl.babyai.levels import (
    NUM_ACTIONS,
    parse_level_weights,
    resolve_levels,
)
from mop_torchrl.babyai.tokenizer import MissionTokenizer
from mop_torchrl.babyai.view import agent_view

__all__ = ["BabyAIObservation", "LevelMixture", "make_babyai_gym_env"]


class _ObsGridMemo:
    """``MiniGridEnv.gen_obs_grid`` computed once per env state.

    On every step minigrid computes the agent's view for the observation, and the bot computes
    it again to update its map: measured on GoToLocal, about a quarter of the env + bot time.
    The view depends on the grid, the agent's position, direction and carried object, and the
    grid changes only inside ``step`` (which counts ``step_count`` up first) or by ``reset``
    (a new grid object). A deep copy of the env (the bot's path-ratio rollout) copies the memo
    with it, bound to the copy. The view itself comes from :func:`agent_view`.
    """

    def __init__(self, env: gym.Env) -> None:
        self.env = env
        self.grid = self.carrying = self.state = self.value = None
        # a level that overrides gen_obs_grid keeps its own; the others get the direct view
        stock = type(env).gen_obs_grid is MiniGridEnv.gen_obs_grid
        self.view = agent_view if stock else type(env).gen_obs_grid

    def __call__(self, agent_view_size: int | None = None) -> Any:
        env = self.env
        if agent_view_size is not None:
            return type(env).gen_obs_grid(env, agent_view_size)
        state = (env.step_count, int(env.agent_pos[0]), int(env.agent_pos[1]), env.agent_dir)
        if (
            self.value is None
            or env.grid is not self.grid
            or env.carrying is not self.carrying
            or state != self.state
        ):
            self.value = self.view(env)
            self.grid, self.carrying, self.state = env.grid, env.carrying, state
        return self.value


def _memoise_obs_grid(env: gym.Env) -> None:
    for level_env in getattr(env, "envs", [env]):  # a LevelMixture holds one env per level
        unwrapped = level_env.unwrapped
        unwrapped.gen_obs_grid = _ObsGridMemo(unwrapped)


class LevelMixture(gym.Wrapper):
    """Several BabyAI levels behind one gymnasium env: each reset draws the episode's level.

    The level is drawn with ``weights`` from a generator seeded by the first seeded reset; each
    level's env is seeded from that seed too (first use), then continues its own stream. The
    observation gains ``"level"``, the drawn level's index. ``self.env`` (and so
    ``unwrapped``, which the bot reads) is the current level's env. All BabyAI levels share
    their observation and action spaces; each keeps its own ``max_steps``.

    Examples:
        >>> import gymnasium as gym
        >>> from mop_torchrl.babyai.wrappers import LevelMixture
        >>> env = LevelMixture([gym.make("BabyAI-GoToRedBall-v0"), gym.make("BabyAI-GoToLocal-v0")])
        >>> levels = {int(env.reset(seed=i)[0]["level"]) for i in range(8)}
        >>> sorted(levels), env.unwrapped is env.envs[env.current].unwrapped
        ([0, 1], True)
    """

    def __init__(self, envs: Sequence[gym.Env], weights: Sequence[float] | None = None) -> None:
        if not envs:
            raise ValueError("LevelMixture needs at least one env")
        super().__init__(envs[0])
        self.envs = list(envs)
        self.weights = np.asarray(parse_level_weights(weights, len(self.envs)))
        self.current = 0
        self._rng = np.random.default_rng()
        self._pending: list[int | None] = [None] * len(self.envs)
        self.observation_space = spaces.Dict(
            {**envs[0].observation_space.spaces, "level": spaces.Discrete(len(self.envs))}
        )

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        if seed is not None:
            children = np.random.SeedSequence(seed).spawn(len(self.envs) + 1)
            self._rng = np.random.default_rng(children[0])
            self._pending = [int(c.generate_state(1)[0]) for c in children[1:]]
        self.current = int(self._rng.choice(len(self.envs), p=self.weights))
        self.env = self.envs[self.current]
        level_seed, self._pending[self.current] = self._pending[self.current], None
        obs, info = self.env.reset(seed=level_seed, options=options)
        return {**obs, "level": np.int64(self.current)}, info

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return {**obs, "level": np.int64(self.current)}, reward, terminated, truncated, info

    def close(self) -> None:
        for env in self.envs:
            env.close()


class BabyAIObservation(gym.Wrapper):
    """Gymnasium wrapper making a BabyAI env TorchRL-friendly (fixed-size integer arrays).

    Observation (a ``spaces.Dict``): ``image`` uint8 ``(7, 7, 3)``; ``direction``
    ``Discrete(4)``; ``carrying`` ``Discrete(2)``; ``mission`` int64 ``(72,)`` token ids
    (0-padded); with ``expert=True`` also ``expert_action``, an int64 scalar in ``[-1, 6]``:
    the BabyAI bot's action for this very observation, ``-1`` where the bot failed.

    ``info`` of every reset and step holds ``success`` (``np.bool_``), ``bot_failures``
    (``np.int64``, this episode, with ``expert=True``), ``bot_errors`` (``np.int64``, this
    episode, with ``expert=True`` or ``path_ratio=True``) and ``bot_solution_length``
    (``np.int64``, with ``path_ratio=True``).

    Args:
        env: a BabyAI gymnasium env (``gym.make("BabyAI-...")``).
        expert (bool, optional): label observations with the bot. Defaults to ``False``.
        path_ratio (bool, optional): at each reset, roll the bot out on a deep copy of the env
            and report its episode length as ``bot_solution_length``. Defaults to ``False``.
        seed (int, optional): seed used by the first reset that receives no seed; later resets
            continue the env's random stream. Defaults to ``None``.
        bot_budget (int, optional): subgoal-loop iterations per bot replan.
        bot_time_limit (float, optional): seconds per bot replan. Defaults to ``None``.
        tokenizer (MissionTokenizer, optional): defaults to ``MissionTokenizer()``.
        quiet (bool, optional): swallow the "Sampling rejected" lines minigrid prints while
            generating a level. Defaults to ``True``.

    Examples:
        >>> import gymnasium as gym
        >>> from mop_torchrl.babyai.wrappers import BabyAIObservation
        >>> env = BabyAIObservation(gym.make("BabyAI-GoToRedBall-v0"), expert=True, seed=0)
        >>> obs, info = env.reset()
        >>> obs["mission"].shape, obs["image"].dtype, int(obs["expert_action"]) in range(7)
        ((72,), dtype('uint8'), True)
        >>> obs, reward, terminated, truncated, info = env.step(2)
        >>> sorted(info)
        ['bot_errors', 'bot_failures', 'success']
    """

    def __init__(
        self,
        env: gym.Env,
        expert: bool = False,
        path_ratio: bool = False,
        seed: int | None = None,
        bot_budget: int | None = DEFAULT_BOT_BUDGET,
        bot_time_limit: float | None = None,
        tokenizer: MissionTokenizer | None = None,
        quiet: bool = True,
    ) -> None:
        super().__init__(env)
        _memoise_obs_grid(env)
        self.tokenizer = tokenizer if tokenizer is not None else MissionTokenizer()
        self.expert_enabled = expert
        self.path_ratio = path_ratio
        self.bot_budget = bot_budget
        self.bot_time_limit = bot_time_limit
        self.quiet = quiet
        self._pending_seed = seed
        self.bot_errors = BotErrors()
        self._errors_at_reset = 0
        self._expert = (
            BabyAIExpert(
                env, max_iterations=bot_budget, max_seconds=bot_time_limit, errors=self.bot_errors
            )
            if expert
            else None
        )
        self._mission_cache: dict[str, np.ndarray] = {}
        self._mission: np.ndarray | None = None
        self._solution_length = np.int64(-1)
        image_space = env.observation_space["image"]
        obs_spaces: dict[str, spaces.Space] = {
            "image": spaces.Box(0, 255, image_space.shape, dtype=np.uint8),
            "direction": spaces.Discrete(4),
            "carrying": spaces.Discrete(2),
            "mission": spaces.Box(
                0,
                self.tokenizer.vocab_size - 1,
                (self.tokenizer.max_length,),
                dtype=np.int64,
            ),
        }
        if "level" in env.observation_space.spaces:
            obs_spaces["level"] = env.observation_space["level"]
        if expert:
            obs_spaces["expert_action"] = spaces.Box(-1, NUM_ACTIONS - 1, (), dtype=np.int64)
        self.observation_space = spaces.Dict(obs_spaces)

    @property
    def info_keys(self) -> list[str]:
        """The keys this wrapper writes in ``info``."""
        keys = ["success"]
        if self.expert_enabled:
            keys.append("bot_failures")
        if self.expert_enabled or self.path_ratio:
            keys.append("bot_errors")
        if self.path_ratio:
            keys.append("bot_solution_length")
        return keys

    def _encode_mission(self, mission: str) -> np.ndarray:
        arr = self._mission_cache.get(mission)
        if arr is None:
            arr = np.asarray(self.tokenizer.encode_padded(mission), dtype=np.int64)
            if len(self._mission_cache) < 100_000:
                self._mission_cache[mission] = arr
        return arr

    def _observation(self, obs: dict[str, Any], expert_action: int | None) -> dict[str, Any]:
        out = {
            "image": obs["image"],
            "direction": np.int64(obs["direction"]),
            "carrying": np.int64(self.env.unwrapped.carrying is not None),
            "mission": self._mission.copy(),  # never hand out the cached array
        }
        if "level" in obs:
            out["level"] = np.int64(obs["level"])
        if expert_action is not None:
            out["expert_action"] = np.int64(expert_action)
        return out

    def _info(self, success: bool) -> dict[str, Any]:
        info: dict[str, Any] = {"success": np.bool_(success)}
        if self._expert is not None:
            info["bot_failures"] = np.int64(self._expert.failures)
        if self.expert_enabled or self.path_ratio:
            info["bot_errors"] = np.int64(self.bot_errors.total - self._errors_at_reset)
        if self.path_ratio:
            info["bot_solution_length"] = self._solution_length
        return info

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        if seed is None:
            seed = self._pending_seed
        self._pending_seed = None
        if self.quiet:
            with contextlib.redirect_stdout(io.StringIO()):
                obs, info = self.env.reset(seed=seed, options=options)
        else:
            obs, info = self.env.reset(seed=seed, options=options)
        self._mission = self._encode_mission(obs["mission"])
        self._errors_at_reset = self.bot_errors.total
        if self.path_ratio:
            self._solution_length = np.int64(
                bot_solution_length(
                    self.env, self.bot_budget, self.bot_time_limit, errors=self.bot_errors
                )
            )
        label = self._expert.reset() if self._expert is not None else None
        return self._observation(obs, label), {**info, **self._info(False)}

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        action = int(action)
        obs, reward, terminated, truncated, info = self.env.step(action)
        label = None
        if self._expert is not None:
            label = -1 if (terminated or truncated) else self._expert.replan(action)
        success = bool(terminated and reward > 0)
        return (
            self._observation(obs, label),
            reward,
            terminated,
            truncated,
            {**info, **self._info(success)},
        )


def make_babyai_gym_env(
    level: str | Sequence[str],
    seed: int | None = None,
    expert: bool = False,
    path_ratio: bool = False,
    bot_budget: int | None = DEFAULT_BOT_BUDGET,
    bot_time_limit: float | None = None,
    quiet: bool = True,
    level_weights: str | Sequence[float] | None = None,
    **make_kwargs: Any,
) -> BabyAIObservation:
    """``gym.make(level)`` wrapped in :class:`BabyAIObservation` (a plain gymnasium env).

    Several levels (a sequence or ``"A,B"``) are mixed by a :class:`LevelMixture` drawing one
    per episode with ``level_weights`` (default uniform).

    Examples:
        >>> from mop_torchrl.babyai.wrappers import make_babyai_gym_env
        >>> env = make_babyai_gym_env("GoToLocal", seed=0)
        >>> obs, info = env.reset()
        >>> sorted(obs)
        ['carrying', 'direction', 'image', 'mission']
    """
    levels = resolve_levels(level)
    if len(levels) == 1:
        env = gym.make(levels[0], **make_kwargs)
    else:
        env = LevelMixture([gym.make(lv, **make_kwargs) for lv in levels], level_weights)
    return BabyAIObservation(
        env,
        expert=expert,
        path_ratio=path_ratio,
        seed=seed,
        bot_budget=bot_budget,
        bot_time_limit=bot_time_limit,
        quiet=quiet,
    )
