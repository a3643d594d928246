"""BabyAI environments for TorchRL.

``GymEnv("BabyAI-...")`` fails because TorchRL cannot convert minigrid's text mission space.
:class:`BabyAIObservation` is a gymnasium wrapper that turns the minigrid observation into
fixed-size integer arrays (the mission tokenised with :class:`~mop_torchrl.babyai.tokenizer.
MissionTokenizer`), optionally labels every observation with the BabyAI bot's action, and puts
episode metrics in the step ``info``. :func:`make_babyai_env` wraps it with
:class:`~torchrl.envs.GymWrapper`, batches it (:class:`~torchrl.envs.ParallelEnv` or
:class:`~torchrl.envs.SerialEnv`) and adds :class:`~torchrl.envs.InitTracker`,
:class:`~torchrl.envs.StepCounter` and :class:`~torchrl.envs.RewardSum`.

Output keys (shapes per env; a batched env prepends ``[num_envs]``):

- ``"image"``: uint8 ``(7, 7, 3)``, the egocentric view (object, colour, state indices).
- ``"direction"``: int64 ``()``, ``Categorical(4)``.
- ``"carrying"``: int64 ``()``, 1 when the agent holds an object.
- ``"mission"``: int64 ``(72,)``, mission token ids, 0-padded.
- ``"level"`` (several levels only): int64 ``()``, the index of this episode's level in the
  list given to :func:`make_babyai_env` (:class:`LevelMixture`).
- ``"expert_action"`` (``expert=True``): int64 ``()``, the bot's action for this observation,
  ``-1`` where the bot failed; same shape and dtype as ``"action"``.
- ``"is_init"`` bool ``(1,)``, ``"step_count"`` int64 ``(1,)``, ``"episode_reward"`` float32
  ``(1,)``: from ``InitTracker``, ``StepCounter`` and ``RewardSum``.
- ``("next", "success")``: bool ``()``, the episode terminated with a positive reward.
- ``("next", "bot_failures")`` (``expert=True``): int64 ``()``, bot failures (exhausted
  planning budget) so far in the episode.
- ``("next", "bot_errors")`` (``expert=True`` or ``path_ratio=True``): int64 ``()``, other
  exceptions of the bot so far in the episode (its labels are ``-1`` too; see
  :class:`~mop_torchrl.babyai.bot.BotErrors`).
- ``("next", "bot_solution_length")`` (``path_ratio=True``): int64 ``()``, the number of steps
  the bot needs from the episode's start (``-1`` if it fails); path ratio =
  ``step_count / bot_solution_length`` on successful episodes.

The metrics are also present at the root of a reset tensordict (``success`` False,
``bot_failures`` counting the reset's own label). On the last step of an episode (terminated
or truncated) the bot is not run: ``("next", "expert_action")`` is ``-1`` there without
counting a failure, since that observation is never acted on.
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Iterator, Sequence
from typing import Any

import gymnasium as gym
import minigrid  # noqa: F401  (registers the BabyAI-* ids)
import numpy as np
import torch
from gymnasium import spaces
from torch import nn
from torchrl.data import Bounded, Composite, Unbounded
from torchrl.envs import (
    Compose,
    EnvBase,
    GymWrapper,
    InitTracker,
    ParallelEnv,
    RewardSum,
    SerialEnv,
    StepCounter,
    TransformedEnv,
    default_info_dict_reader,
)
from torchrl.modules.utils import get_primers_from_module

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

__all__ = [
    "BabyAIObservation",
    "LevelMixture",
    "keep_num_threads",
    "make_babyai_env",
    "make_babyai_gym_env",
    "worker_seeds",
]


@contextlib.contextmanager
def keep_num_threads() -> Iterator[None]:
    """Restores torch's intra-op thread count on exit.

    Closing a batched env raises it (torchrl 0.14): a training loop that evaluates or
    re-creates its collector would otherwise continue with more threads than it asked for,
    which changes the rounding of its updates and, with OpenMP spin-waiting on a busy machine,
    made them several times slower.
    """
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def worker_seeds(seed: int, num_envs: int) -> list[int]:
    """Distinct, deterministic per-env seeds derived from ``seed``.

    Env ``i`` gets the same seed whatever ``num_envs`` is (``numpy.random.SeedSequence``
    children), and different base seeds give unrelated 32-bit seeds.

    Examples:
        >>> from mop_torchrl.babyai.envs import worker_seeds
        >>> s = worker_seeds(0, 3)
        >>> len(set(s)), worker_seeds(0, 2) == s[:2]
        (3, True)
    """
    children = np.random.SeedSequence(seed).spawn(num_envs)
    return [int(c.generate_state(1, dtype=np.uint32)[0]) for c in children]


class LevelMixture(gym.Wrapper):
    """Several BabyAI levels behind one gymnasium env: each reset draws the episode's level.

    The level is drawn with ``weights`` from a generator seeded by the first seeded reset; each
    level's env is seeded from that seed too (first use), then continues its own stream. The
    observation gains ``"level"``, the drawn level's index. ``self.env`` (and so
    ``unwrapped``, which the bot reads) is the current level's env. All BabyAI levels share
    their observation and action spaces; each keeps its own ``max_steps``.

    Examples:
        >>> import gymnasium as gym
        >>> from mop_torchrl.babyai.envs import LevelMixture
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
        >>> from mop_torchrl.babyai.envs import BabyAIObservation
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
        >>> from mop_torchrl.babyai.envs import make_babyai_gym_env
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


def _info_spec(expert: bool, path_ratio: bool) -> Composite:
    spec = {"success": Unbounded((), dtype=torch.bool)}
    if expert:
        spec["bot_failures"] = Unbounded((), dtype=torch.int64)
    if expert or path_ratio:
        spec["bot_errors"] = Unbounded((), dtype=torch.int64)
    if path_ratio:
        spec["bot_solution_length"] = Unbounded((), dtype=torch.int64)
    return Composite(spec, shape=())


def _make_torchrl_env(
    level: str | list[str],
    seed: int | None,
    expert: bool,
    path_ratio: bool,
    bot_budget: int | None,
    bot_time_limit: float | None,
    quiet: bool,
    device: str | torch.device | None,
    level_weights: list[float] | None = None,
) -> GymWrapper:
    # Module-level so that functools.partial of it pickles into ParallelEnv workers.
    genv = make_babyai_gym_env(
        level,
        seed=seed,
        expert=expert,
        path_ratio=path_ratio,
        bot_budget=bot_budget,
        bot_time_limit=bot_time_limit,
        quiet=quiet,
        level_weights=level_weights,
    )
    env = GymWrapper(genv, categorical_action_encoding=True, device=device)
    if expert:
        # GymWrapper maps a scalar Box to shape (1,); the label must match the action's shape.
        obs_spec = env.observation_spec.clone()
        obs_spec["expert_action"] = Bounded(
            -1, NUM_ACTIONS - 1, shape=(), dtype=torch.int64, device=obs_spec.device
        )
        env.observation_spec = obs_spec
    spec = _info_spec(expert, path_ratio)
    env.set_info_dict_reader(default_info_dict_reader(list(spec.keys()), spec=spec))
    return env


def make_babyai_env(
    level: str | Sequence[str],
    num_envs: int = 1,
    seed: int = 0,
    expert: bool = False,
    device: str | torch.device = "cpu",
    parallel: bool = True,
    path_ratio: bool = False,
    bot_budget: int | None = DEFAULT_BOT_BUDGET,
    bot_time_limit: float | None = None,
    quiet: bool = True,
    mp_start_method: str | None = None,
    policy: nn.Module | None = None,
    level_weights: str | Sequence[float] | None = None,
) -> EnvBase:
    """A TorchRL env for a BabyAI level, optionally batched and labelled by the bot.

    Args:
        level (str or list of str): a registered ``BabyAI-*`` id, or its short form
            (``"GoToRedBall"``). Several levels (a list, or ``"GoToRedBall,GoToLocal"``): each
            env draws its level per episode (:class:`LevelMixture`) and the observation gains
            ``"level"``, the level's index in this list.
        num_envs (int, optional): number of envs. ``1`` gives an unbatched env; more gives a
            :class:`~torchrl.envs.ParallelEnv` (``parallel=True``) or
            :class:`~torchrl.envs.SerialEnv` of batch size ``[num_envs]``. Defaults to ``1``.
        seed (int, optional): base seed; env ``i`` is seeded with ``worker_seeds(seed,
            num_envs)[i]`` at its first reset, and later resets continue its random stream.
            ``env.set_seed`` still works on top. Defaults to ``0``.
        expert (bool, optional): add ``"expert_action"``, the bot's action for each
            observation (computed in the env process, so it works with parallel envs), and
            ``"bot_failures"``. Defaults to ``False``.
        device (torch.device, optional): device of the output tensordicts. Defaults to CPU.
        parallel (bool, optional): for ``num_envs > 1``, ``ParallelEnv`` (one process per env)
            if ``True``, else ``SerialEnv`` (all in this process). On a 2-core machine
            ``SerialEnv`` is faster; see ``benchmarks/bench_env.py``. Defaults to ``True``.
        path_ratio (bool, optional): add ``"bot_solution_length"``, the bot's episode length
            from each episode's start (one extra bot rollout per reset). Defaults to ``False``.
        bot_budget (int, optional): subgoal-loop iterations allowed per bot replan; ``None``
            for no bound. Defaults to :data:`~mop_torchrl.babyai.bot.DEFAULT_BOT_BUDGET`.
        bot_time_limit (float, optional): seconds allowed per bot replan. Defaults to ``None``.
        quiet (bool, optional): hide minigrid's "Sampling rejected" prints. Defaults to ``True``.
        mp_start_method (str, optional): passed to ``ParallelEnv``.
        policy (nn.Module, optional): a policy whose recurrent-state primers
            (:func:`~torchrl.modules.utils.get_primers_from_module`) are appended to the env, as
            TorchRL's ``GymEnv(..., policy=policy)`` does, so that ``env.rollout(n, policy)``
            carries its hidden state. Defaults to ``None``.
        level_weights (str or list of float, optional): the levels' sampling weights
            (normalised); default uniform.

    Returns:
        a :class:`~torchrl.envs.TransformedEnv` with ``InitTracker``, ``StepCounter`` and
        ``RewardSum``, categorical actions of shape ``[*batch]``.

    Raises:
        ValueError: for an unknown level (listing near matches) or ``num_envs < 1``.

    Examples:
        >>> from mop_torchrl.babyai.envs import make_babyai_env
        >>> env = make_babyai_env("GoToLocal", num_envs=2, expert=True, parallel=False)
        >>> td = env.rollout(5, break_when_any_done=False)
        >>> td["mission"].shape, td["expert_action"].shape == td["action"].shape
        (torch.Size([2, 5, 72]), True)
        >>> sorted(k for k in ("success", "bot_failures") if ("next", k) in td.keys(True))
        ['bot_failures', 'success']
        >>> env.close()
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    levels = resolve_levels(level)
    weights = parse_level_weights(level_weights, len(levels))
    seeds = worker_seeds(seed, num_envs)
    factories = [
        functools.partial(
            _make_torchrl_env,
            level=levels if len(levels) > 1 else levels[0],
            seed=s,
            expert=expert,
            path_ratio=path_ratio,
            bot_budget=bot_budget,
            bot_time_limit=bot_time_limit,
            quiet=quiet,
            device=None if num_envs > 1 else device,
            level_weights=weights if len(levels) > 1 else None,
        )
        for s in seeds
    ]
    if num_envs == 1:
        base: EnvBase = factories[0]()
    elif parallel:
        base = ParallelEnv(num_envs, factories, device=device, mp_start_method=mp_start_method)
    else:
        base = SerialEnv(num_envs, factories, device=device)
    env = TransformedEnv(base, Compose(InitTracker(), StepCounter(), RewardSum()))
    if policy is not None:
        primers = get_primers_from_module(policy, warn=False)
        if primers is not None:
            env.append_transform(primers)
    return env
