"""BabyAI environments for TorchRL.

``GymEnv("BabyAI-...")`` fails because TorchRL cannot convert minigrid's text mission space.
The gymnasium wrapper :class:`~mop_torchrl.babyai.wrappers.BabyAIObservation` turns the minigrid
observation into fixed-size integer arrays, optionally labels every observation with the BabyAI
bot's action, and puts episode metrics in the step ``info``. :func:`make_babyai_env` wraps it with
:class:`~torchrl.envs.GymWrapper`, batches it (:class:`~torchrl.envs.ParallelEnv`, or in process
:class:`~mop_torchrl.babyai.batched.BabyAIBatchedEnv`) and adds :class:`~torchrl.envs.InitTracker`,
:class:`~torchrl.envs.StepCounter` and :class:`~torchrl.envs.RewardSum`.

Output keys (shapes per env; a batched env prepends ``[num_envs]``):

- ``"image"``: uint8 ``(7, 7, 3)``, the egocentric view (object, colour, state indices).
- ``"direction"``: int64 ``()``, ``Categorical(4)``.
- ``"carrying"``: int64 ``()``, 1 when the agent holds an object.
- ``"mission"``: int64 ``(72,)``, mission token ids, 0-padded.
- ``"level"`` (several levels only): int64 ``()``, the index of this episode's level in the
  list given to :func:`make_babyai_env` (:class:`~mop_torchrl.babyai.wrappers.LevelMixture`).
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
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torchrl.data import Bounded, Composite, Unbounded
from torchrl.envs import (
    Compose,
    EnvBase,
    GymWrapper,
    InitTracker,
    ParallelEnv,
    RewardSum,
    StepCounter,
    TransformedEnv,
    default_info_dict_reader,
)
from torchrl.modules.utils import get_primers_from_module

from mop_torchrl.babyai.batched import BabyAIBatchedEnv
from mop_torchrl.babyai.bot import DEFAULT_BOT_BUDGET
from mop_torchrl.babyai.levels import NUM_ACTIONS, parse_level_weights, resolve_levels
from mop_torchrl.babyai.wrappers import BabyAIObservation, LevelMixture, make_babyai_gym_env

__all__ = [
    "BabyAIObservation",
    "LevelMixture",
    "keep_num_threads",
    "make_babyai_env",
    "make_babyai_gym_env",
    "worker_seeds",
]
"""``BabyAIObservation``, ``LevelMixture`` and ``make_babyai_gym_env`` live in
:mod:`mop_torchrl.babyai.wrappers` (gymnasium only) and are re-exported here."""


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


def _info_spec(expert: bool, path_ratio: bool) -> Composite:
    spec = {"success": Unbounded((), dtype=torch.bool)}
    if expert:
        spec["bot_failures"] = Unbounded((), dtype=torch.int64)
    if expert or path_ratio:
        spec["bot_errors"] = Unbounded((), dtype=torch.int64)
    if path_ratio:
        spec["bot_solution_length"] = Unbounded((), dtype=torch.int64)
    return Composite(spec, shape=())


def _gym_wrapper(genv: BabyAIObservation, device: str | torch.device | None) -> GymWrapper:
    """TorchRL's wrapper of one BabyAI gymnasium env, with the label and info keys in its specs."""
    env = GymWrapper(genv, categorical_action_encoding=True, device=device)
    if genv.expert_enabled:
        # GymWrapper maps a scalar Box to shape (1,); the label must match the action's shape.
        obs_spec = env.observation_spec.clone()
        obs_spec["expert_action"] = Bounded(
            -1, NUM_ACTIONS - 1, shape=(), dtype=torch.int64, device=obs_spec.device
        )
        env.observation_spec = obs_spec
    spec = _info_spec(genv.expert_enabled, genv.path_ratio)
    env.set_info_dict_reader(default_info_dict_reader(list(spec.keys()), spec=spec))
    return env


def _make_torchrl_env(device: str | torch.device | None, **gym_kwargs) -> GymWrapper:
    # Module-level so that functools.partial of it pickles into ParallelEnv workers.
    return _gym_wrapper(make_babyai_gym_env(**gym_kwargs), device)


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
            :class:`~mop_torchrl.babyai.batched.BabyAIBatchedEnv` of batch size ``[num_envs]``.
            Defaults to ``1``.
        seed (int, optional): base seed; env ``i`` is seeded with ``worker_seeds(seed,
            num_envs)[i]`` at its first reset, and later resets continue its random stream.
            ``env.set_seed`` still works on top. Defaults to ``0``.
        expert (bool, optional): add ``"expert_action"``, the bot's action for each
            observation (computed in the env process, so it works with parallel envs), and
            ``"bot_failures"``. Defaults to ``False``.
        device (torch.device, optional): device of the output tensordicts. Defaults to CPU.
        parallel (bool, optional): for ``num_envs > 1``, ``ParallelEnv`` (one process per env)
            if ``True``, else ``BabyAIBatchedEnv`` (all in this process, the data of
            ``SerialEnv`` at a fraction of its overhead). On a 2-core machine the in-process
            env is faster; see ``benchmarks/bench_env.py``. Defaults to ``True``.
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
    gym_kwargs = [
        dict(
            level=levels if len(levels) > 1 else levels[0],
            seed=s,
            expert=expert,
            path_ratio=path_ratio,
            bot_budget=bot_budget,
            bot_time_limit=bot_time_limit,
            quiet=quiet,
            level_weights=weights if len(levels) > 1 else None,
        )
        for s in worker_seeds(seed, num_envs)
    ]
    if num_envs == 1:
        base: EnvBase = _make_torchrl_env(device, **gym_kwargs[0])
    elif parallel:
        factories = [functools.partial(_make_torchrl_env, None, **kw) for kw in gym_kwargs]
        base = ParallelEnv(num_envs, factories, device=device, mp_start_method=mp_start_method)
    else:
        genvs = [make_babyai_gym_env(**kw) for kw in gym_kwargs]
        base = BabyAIBatchedEnv(genvs, _gym_wrapper(genvs[0], None), device=device)
    env = TransformedEnv(base, Compose(InitTracker(), StepCounter(), RewardSum()))
    if policy is not None:
        primers = get_primers_from_module(policy, warn=False)
        if primers is not None:
            env.append_transform(primers)
    return env
