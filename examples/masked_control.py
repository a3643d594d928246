"""Masked classic control for the RL recipes: the envs and the cores they compare.

``recurrent_ppo.py`` and ``recurrent_dqn.py`` both import this module (it sits beside them, so
running either script finds it). Gymnasium's ``CartPole-v1`` observing the cart position and the
pole angle only (the RL Zoo's ``CartPoleNoVel``), ``Pendulum-v1`` observing ``cos θ, sin θ`` only
(``PendulumNoVel``): a TorchRL ``UnaryTransform`` drops the velocities, so a policy has to infer
them from memory. The core (``mop | gru | lstm``) is the one thing a recipe's runs differ in.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import nn
from torchrl.envs import (
    Compose,
    GymEnv,
    InitTracker,
    RewardScaling,
    RewardSum,
    SerialEnv,
    StepCounter,
    Transform,
    TransformedEnv,
    UnaryTransform,
    VecNorm,
)
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import GRUModule, LSTMModule

from mop_torchrl import MoPConfig, MoPModule

# task: (gymnasium id, observation entries kept, steps per episode at most)
TASKS = {"pendulum": ("Pendulum-v1", [0, 1], 200), "cartpole": ("CartPole-v1", [0, 2], 500)}


def configure_torch(seed: int) -> None:
    """Seeds torch and sets what every recipe run uses: one thread, subnormals flushed (they
    made the recurrent updates ~4x slower on CPU, measured)."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


class ReturnScaling(Transform):
    """Divides each reward by a running std of the ``gamma``-discounted return, clipped to
    ±``clip``: SB3's ``VecNormalize`` reward normalisation (the RL Zoo's ``normalize: True``,
    with the algorithm's ``gamma``). TorchRL's ``VecNorm`` normalises the reward by its own
    mean and std instead, which for CartPole (a reward of 1 at every step) removes it all.

    The return is tracked per env (zeroed where an episode ends) and its mean and variance
    accumulated over every step seen, as ``RunningMeanStd`` does.

    As in ``VecNormalize``, the first steps' rewards are large (the std of a few equal returns is
    near 0; clipped to 10 at the first step), and the scale settles after a few thousand steps
    (on the CartPole recipe near 0.065 from ~13k frames on).

    Examples:
        >>> env = make_env("cartpole", 2, 0, reward_scale=None, return_gamma=0.98)
        >>> rewards = env.rollout(40)["next", "reward"].squeeze(-1)  # CartPole's reward is 1
        >>> rewards[0, :3]
        tensor([10.0000,  2.0405,  1.2623])
    """

    def __init__(self, gamma: float, clip: float = 10.0, eps: float = 1e-8) -> None:
        super().__init__(in_keys=["reward"], out_keys=["reward"])
        self.gamma, self.clip, self.eps = gamma, clip, eps
        self.returns: torch.Tensor | None = None  # [num_envs, 1], from the first step
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("var", torch.ones((), dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        reward = next_tensordict["reward"]
        if self.returns is None:  # the first step after a full reset
            self.returns = torch.zeros_like(reward)
        self.returns = self.returns * self.gamma + reward
        self._accumulate(self.returns.double())
        std = (self.var + self.eps).sqrt().to(reward.dtype)
        next_tensordict["reward"] = (reward / std).clamp(-self.clip, self.clip)
        self.returns = self.returns.masked_fill(next_tensordict["done"], 0.0)
        return next_tensordict

    def _accumulate(self, returns: torch.Tensor) -> None:
        """Chan et al.'s parallel update of the running mean and variance by a batch."""
        n, batch_mean = returns.numel(), returns.mean()
        delta, total = batch_mean - self.mean, self.count + n
        m2 = self.var * self.count + returns.var(unbiased=False) * n
        self.var.copy_((m2 + delta**2 * self.count * n / total) / total)
        self.mean.add_(delta * n / total)
        self.count.copy_(total)

    def _reset(
        self, tensordict: TensorDictBase | None, tensordict_reset: TensorDictBase
    ) -> TensorDictBase:
        # Ended episodes' returns are zeroed at their last step; a full reset zeroes them all.
        if tensordict is None or "_reset" not in tensordict:
            self.returns = None
        return tensordict_reset


def make_env(
    task: str,
    num_envs: int,
    seed: int,
    reward_scale: float | None,
    running_norm: bool = True,
    return_gamma: float | None = None,
) -> TransformedEnv:
    """``num_envs`` masked Pendulums (``cos θ, sin θ`` only) or CartPoles (cart position and
    pole angle only). Observations are normalised by running statistics over all envs
    (``VecNorm``, as the Zoo's ``VecNormalize``), or with ``running_norm=False`` divided by the
    observation space's bounds: fixed, so that a replay buffer's old entries mean what new ones
    do (running statistics move after an entry is stored). Rewards are scaled by
    ``reward_scale`` for the critic, or with ``return_gamma`` divided by a running std of the
    discounted return (``ReturnScaling``, as ``VecNormalize``); ``episode_reward`` stays
    unscaled."""
    if (reward_scale is None) == (return_gamma is None):
        raise ValueError(
            f"give one of reward_scale and return_gamma, got {reward_scale} and {return_gamma}"
        )
    env_id, kept, _ = TASKS[task]
    if running_norm:
        normalise = VecNorm(
            in_keys=["observation"], new_api=True, decay=1.0, reduce_batch_dims=True
        )
    else:
        bounds = torch.as_tensor(gym.make(env_id).observation_space.high[kept])
        normalise = UnaryTransform(["observation"], ["observation"], fn=lambda obs: obs / bounds)
    env = TransformedEnv(
        SerialEnv(num_envs, lambda: GymEnv(env_id, categorical_action_encoding=True)),
        Compose(
            UnaryTransform(["observation"], ["observation"], fn=lambda obs: obs[..., kept]),
            normalise,
            InitTracker(),
            StepCounter(),
            RewardSum(),
            RewardScaling(loc=0.0, scale=reward_scale)
            if return_gamma is None
            else ReturnScaling(return_gamma),
        ),
    )
    env.set_seed(seed)
    return env


class OwnEntries(TensorDictModuleBase):
    """Runs a TorchRL ``GRUModule``/``LSTMModule`` on the entries it reads only, and writes its
    outputs back. Those modules reshape the whole TensorDict they are given, at every step, to
    ``[N, 1]`` and back; a recipe's collector passes them one that also holds the other core's
    states, the action's distribution and the env's entries, where the LSTM critic's step cost
    about as much as MoP's core (cProfile). The same tensors go in, so the outputs are the
    same; MoPModule reads and writes its tensors one by one and needs no wrapper."""

    def __init__(self, module: TensorDictModuleBase) -> None:
        super().__init__()
        self.module = module
        self.in_keys, self.out_keys = list(module.in_keys), list(module.out_keys)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        out = self.module(tensordict.select(*self.in_keys, strict=False))
        return tensordict.update(out.select(*self.out_keys))


def make_core(
    kind: str,
    obs_dim: int,
    hidden: int,
    name: str,
    dropout_beta: float | None = None,
    mop_layers: str | None = None,
) -> nn.Module:
    """A MoP, GRU or LSTM core reading ``observation`` and writing ``{name}_features``, its
    hidden state under ``{name}_state`` (so the actor's and the critic's cores do not share
    keys). MoP: the ``paper`` preset (``0,16,32`` x 3 blocks, D=64, router 16), each block's
    GRUs packed into one (``implementation="packed"``: at these sizes the per-op overhead
    dominates, and packing cut the recipe's CPU time per frame to 0.78x of the fused path's);
    ``dropout_beta`` overrides the preset's expert dropout, ``mop_layers`` its expert sizes
    (``"0,32,64"``: one block, about the GRU's CPU per frame in the PPO recipe). A GRU or LSTM
    core comes in :class:`OwnEntries` (``get_primers_from_module`` finds its primer)."""
    if kind == "mop":
        extra = {} if dropout_beta is None else {"dropout_beta": dropout_beta}
        if mop_layers is not None:
            extra["layers"] = mop_layers
        config = MoPConfig.from_preset("paper", input_dim=obs_dim, router_dim=16, **extra)
        return MoPModule(
            config,
            in_key="observation",
            out_key=f"{name}_features",
            state_key=f"{name}_state",
            routing_key=f"{name}_routing",
            implementation="packed",
        )
    if kind == "gru":
        keys = [f"{name}_state"]
        module = GRUModule
    else:
        keys = [f"{name}_state_h", f"{name}_state_c"]
        module = LSTMModule
    core = module(
        obs_dim,
        hidden,
        in_keys=["observation", *keys],
        out_keys=[f"{name}_features", *[("next", k) for k in keys]],
    )
    return OwnEntries(core)


def finished_episodes(batch: TensorDictBase, frames: int) -> list[tuple[int, float]]:
    """``(frames so far, return)`` of every episode that ends in the collected ``batch``
    (``[env, time]``; ``frames`` counts the steps of all batches up to this one's end)."""
    num_envs, steps = batch.shape
    done = batch["next", "done"].squeeze(-1)
    return [
        (
            frames - num_envs * steps + (t + 1) * num_envs,
            batch["next", "episode_reward"][i, t].item(),
        )
        for i, t in done.nonzero().tolist()
    ]


def rolling_returns(curve: list[tuple[int, float]], window: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames at each finished episode of ``curve`` and the mean return of the last ``window``
    episodes there (of all of them before the ``window``-th)."""
    frames = np.array([f for f, _ in curve], dtype=float)
    returns = np.array([r for _, r in curve], dtype=float)
    cumsum = np.concatenate([[0.0], np.cumsum(returns)])
    idx = np.arange(1, len(returns) + 1)
    lo = np.maximum(idx - window, 0)
    return frames, (cumsum[idx] - cumsum[lo]) / (idx - lo)


def frames_to_return(curve: list[tuple[int, float]], target: float, window: int) -> float | None:
    """Frames at the first episode where the mean return of the last ``window`` episodes
    reaches ``target`` (``None``: not yet), the benchmark's "frames to target"."""
    frames, mean = rolling_returns(curve, window)
    hit = np.nonzero((mean >= target) & (np.arange(len(mean)) + 1 >= window))[0]
    return float(frames[hit[0]]) if len(hit) else None


def reached_return(curve: list[tuple[int, float]], stop_return: float | None, window: int) -> bool:
    """Whether the mean return of ``window`` consecutive episodes has reached ``stop_return``
    at some episode so far. Checked after each batch, this stops a run after the batch in which
    its rolling mean first reaches the target, as :func:`frames_to_return` counts it; the last
    ``window`` episodes at the batch's end may have fallen below it again (on Pendulum, with
    20 of them, they often have: such runs went on for up to 30k frames)."""
    return stop_return is not None and frames_to_return(curve, stop_return, window) is not None


def greedy_returns(
    env: TransformedEnv, policy: nn.Module, task: str, seed: int = 0
) -> torch.Tensor:
    """The return of one whole episode per env from a reset, acting deterministically (greedy
    or the mean action): the RL Zoo's kind of final figure. The env is seeded first, so that
    the episodes' starts do not depend on where collection left the env's generators."""
    env.set_seed(seed)
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        rollout = env.rollout(TASKS[task][2], policy, break_when_any_done=False)
    done = rollout["next", "done"].squeeze(-1)
    ends = torch.where(done.any(-1), done.int().argmax(-1), done.shape[-1] - 1)
    return rollout["next", "episode_reward"][torch.arange(done.shape[0]), ends].squeeze(-1)
