"""Several BabyAI envs as one TorchRL env, stepped in one loop (the in-process batched env).

Why not :class:`~torchrl.envs.SerialEnv` of :class:`~torchrl.envs.GymWrapper`: it builds,
validates and stacks one tensordict per sub-env per step. Measured on GoToLocal with bot labels
(16 envs, one core), that bookkeeping cost about as much as the env and the bot together.
:class:`BabyAIBatchedEnv` steps the gymnasium envs in a Python loop, writes each result into a
row of preallocated numpy arrays and builds one tensordict per batch step. Its specs are the
single env's (:func:`~mop_torchrl.babyai.envs.make_babyai_env`) expanded to the batch, and
each env sees the same calls in the same order as it would in ``SerialEnv``, so the data are
the same (``tests/test_batched_env.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl._utils import seed_generator
from torchrl.data import Composite
from torchrl.envs import EnvBase

from mop_torchrl.babyai.wrappers import BabyAIObservation

__all__ = ["BabyAIBatchedEnv"]

_DONE_KEYS = ("done", "terminated", "truncated")


class BabyAIBatchedEnv(EnvBase):
    """``len(envs)`` BabyAI gymnasium envs as one TorchRL env of batch size ``[len(envs)]``.

    A partial reset (``"_reset"`` in the input, as collectors send it) resets only the flagged
    envs. :meth:`set_seed` seeds env ``i`` with the ``i``-th seed of ``seed_generator``'s chain
    and returns the next one, as ``SerialEnv`` does.

    Args:
        envs (list of BabyAIObservation): the envs, all of the same level set and options.
        template (EnvBase): an unbatched TorchRL env over one of them (its
            :class:`~torchrl.envs.GymWrapper`), whose specs, info keys included, the batch has.
        device (torch.device, optional): device of the output tensordicts. Defaults to CPU.

    Examples:
        >>> from mop_torchrl.babyai.envs import make_babyai_env
        >>> env = make_babyai_env("GoToLocal", num_envs=3, parallel=False)
        >>> type(env.base_env).__name__
        'BabyAIBatchedEnv'
        >>> env.rollout(4, break_when_any_done=False)["next", "image"].shape
        torch.Size([3, 4, 7, 7, 3])
        >>> env.close()
    """

    def __init__(
        self,
        envs: Sequence[BabyAIObservation],
        template: EnvBase,
        device: torch.device | str | None = "cpu",
    ) -> None:
        envs = list(envs)
        if not envs:
            raise ValueError("BabyAIBatchedEnv needs at least one env")
        n = len(envs)
        super().__init__(batch_size=torch.Size([n]), device=device)
        self._envs = envs
        self.full_observation_spec = _batched(template.full_observation_spec, n, self.device)
        self.full_action_spec = _batched(template.full_action_spec, n, self.device)
        self.full_reward_spec = _batched(template.full_reward_spec, n, self.device)
        self.full_done_spec = _batched(template.full_done_spec, n, self.device)
        # One numpy row per env for every observation (and info) key, reused across steps.
        self._obs = {
            key: np.zeros(tuple(spec.shape), dtype=_numpy_dtype(spec.dtype))
            for key, spec in self.full_observation_spec.items()
        }
        self._reward = np.zeros((n, 1), dtype=np.float32)
        self._terminated = np.zeros((n, 1), dtype=bool)
        self._truncated = np.zeros((n, 1), dtype=bool)

    def _store(self, i: int, obs: dict, info: dict) -> None:
        for key, rows in self._obs.items():
            rows[i] = obs[key] if key in obs else info[key]

    def _output(self, with_reward: bool) -> TensorDictBase:
        done = self._terminated | self._truncated
        out = {key: torch.from_numpy(rows.copy()) for key, rows in self._obs.items()}
        out.update(
            done=torch.from_numpy(done),
            terminated=torch.from_numpy(self._terminated.copy()),
            truncated=torch.from_numpy(self._truncated.copy()),
        )
        if with_reward:
            out["reward"] = torch.from_numpy(self._reward.copy())
        return TensorDict(out, batch_size=self.batch_size).to(self.device)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        actions = tensordict.get("action").tolist()
        for i, (env, action) in enumerate(zip(self._envs, actions, strict=True)):
            obs, reward, terminated, truncated, info = env.step(action)
            self._store(i, obs, info)
            self._reward[i] = reward
            self._terminated[i] = terminated
            self._truncated[i] = truncated
        return self._output(with_reward=True)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        reset = None if tensordict is None else tensordict.get("_reset", None)
        if reset is None:
            rows = range(len(self._envs))
        else:
            rows = reset.reshape(len(self._envs), -1).any(-1).nonzero().view(-1).tolist()
        for i in rows:
            obs, info = self._envs[i].reset()
            self._store(i, obs, info)
            self._terminated[i] = False
            self._truncated[i] = False
        return self._output(with_reward=False)

    def set_seed(self, seed: int | None = None, static_seed: bool = False) -> int | None:
        for env in self._envs:
            env.reset(seed=seed)
            if seed is not None and not static_seed:
                seed = seed_generator(seed)
        return seed

    def _set_seed(self, seed: int | None) -> None:  # EnvBase's hook; set_seed does the work
        self.set_seed(seed, static_seed=True)

    def close(self, *, raise_if_closed: bool = True) -> None:
        for env in self._envs:
            env.close()
        self._envs = []
        self.is_closed = True


def _batched(spec: Composite, n: int, device: torch.device | None) -> Composite:
    return spec.expand(n, *spec.shape).to(device)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype
