"""DAgger's aggregated dataset on a TorchRL replay buffer, and the β mixing of bot and student.

Online imitation keeps every labelled student rollout in a
:class:`~torchrl.data.TensorDictReplayBuffer` and trains on slices sampled from it, several
updates per collected batch. Each collected row (one env's ``unroll_len`` consecutive steps) is
a *segment* (``"segment"`` id); a :class:`~torchrl.data.SliceSampler` draws slices within a
segment and marks ``is_init`` at each slice start, so the recurrent core restarts there from
the hidden state stored at collection time (SPEC §3), exactly as at collection.

Stored states go stale as the policy changes. R2D2's remedy is a burn-in prefix: the first
``burn_in`` steps of a slice run the current policy from the stored state without a loss
(their labels are set to ``-1``, which the loss ignores), refreshing the state before the
loss-bearing ``slice_len`` steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tensordict import NestedKey, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.data import LazyTensorStorage, SliceSampler, TensorDictReplayBuffer

__all__ = ["BotMixer", "DaggerDataset", "dagger_beta"]


class DaggerDataset:
    """Labelled student rollouts, replayed as ``[batch_slices, burn_in + slice_len]`` slices.

    Args:
        keys: what the policy reads (observations, hidden states, ``is_init``); ``expert_action``
            is stored beside them.
        frames: capacity in frames; the oldest segments are overwritten first.
        slice_len: loss-bearing steps per slice.
        burn_in: steps before them that only refresh the stored state (labels ``-1``).
        batch_slices: slices per sample.

    :meth:`dumps`/:meth:`loads` save and restore it with the TorchRL replay buffer's own.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> data = TensorDict(
        ...     obs=torch.randn(4, 8, 3), is_init=torch.zeros(4, 8, 1, dtype=torch.bool),
        ...     expert_action=torch.randint(7, (4, 8)), batch_size=[4, 8])
        >>> dataset = DaggerDataset(["obs", "is_init"], frames=64, slice_len=4, burn_in=2,
        ...                         batch_slices=3)
        >>> dataset.extend(data)
        >>> sample = dataset.sample()
        >>> sample.shape, bool(sample["is_init"][:, 0].all()), sample["expert_action"][:, :2].tolist()
        (torch.Size([3, 6]), True, [[-1, -1], [-1, -1], [-1, -1]])
    """

    def __init__(
        self,
        keys: Sequence[NestedKey],
        frames: int,
        slice_len: int,
        burn_in: int = 0,
        batch_slices: int = 16,
    ) -> None:
        self.keys = [*dict.fromkeys([*keys, "is_init", "expert_action"])]
        self.burn_in = burn_in
        self.shape = (batch_slices, burn_in + slice_len)
        self.buffer = TensorDictReplayBuffer(
            storage=LazyTensorStorage(frames),
            sampler=SliceSampler(slice_len=self.shape[1], traj_key="segment", strict_length=True),
            batch_size=batch_slices * self.shape[1],
        )
        self._segments = 0

    def __len__(self) -> int:
        return len(self.buffer)

    def extend(self, batch: TensorDictBase) -> None:
        """Adds a collected ``[num_envs, T]`` batch; each row becomes one segment."""
        if batch.ndim != 2 or batch.shape[1] < self.shape[1]:
            raise ValueError(
                f"expected a [num_envs, T] batch with T >= {self.shape[1]} "
                f"(burn_in + slice_len), got shape {tuple(batch.shape)}"
            )
        rows = batch.select(*self.keys).clone()
        ids = torch.arange(self._segments, self._segments + batch.shape[0])
        rows["segment"] = ids[:, None].expand(batch.shape)
        self.buffer.extend(rows.reshape(-1))
        self._segments += batch.shape[0]

    def dumps(self, path: str | Path) -> None:
        """Writes the replay buffer (storage, sampler, writer) to the directory ``path``."""
        self.buffer.dumps(path)

    def loads(self, path: str | Path) -> None:
        """Restores what :meth:`dumps` wrote."""
        self.buffer.loads(path)
        stored = self.buffer.storage[: len(self.buffer)]["segment"]
        self._segments = int(stored.max()) + 1 if len(self.buffer) else 0

    def sample(self) -> TensorDictBase:
        """Slices with ``is_init`` at each start and burn-in labels set to ``-1``."""
        if len(self.buffer) == 0:
            raise RuntimeError("the DAgger dataset is empty: extend it before sampling")
        td = self.buffer.sample().reshape(self.shape).select(*self.keys)
        if self.burn_in:
            td["expert_action"][:, : self.burn_in] = -1
        return td


def dagger_beta(beta: float, decay_updates: int, update: int) -> float:
    """DAgger's β at ``update``: ``beta`` decaying linearly to 0 over ``decay_updates``.

    Examples:
        >>> [dagger_beta(0.5, 4, u) for u in (0, 2, 4, 8)], dagger_beta(0.3, 0, 100)
        ([0.5, 0.25, 0.0, 0.0], 0.3)
    """
    if decay_updates <= 0:
        return beta
    return beta * max(0.0, 1.0 - update / decay_updates)


class BotMixer(TensorDictModuleBase):
    """Replaces the student's ``action`` by the bot's label with probability ``beta``.

    Steps where the bot failed (label ``-1``) keep the student's action. Put it after the actor
    in the collection policy; set ``beta`` (e.g. from :func:`dagger_beta`) between batches.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> td = TensorDict(action=torch.zeros(4, dtype=torch.long),
        ...                 expert_action=torch.tensor([1, 2, -1, 3]), batch_size=[4])
        >>> BotMixer(beta=1.0)(td)["action"].tolist()
        [1, 2, 0, 3]
    """

    def __init__(self, beta: float = 0.0) -> None:
        super().__init__()
        self.in_keys = ["action", "expert_action"]
        self.out_keys = ["action"]
        self.beta = beta

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        if self.beta <= 0:
            return tensordict
        action, label = tensordict["action"], tensordict["expert_action"]
        take = (torch.rand(action.shape) < self.beta) & (label >= 0)
        tensordict["action"] = torch.where(take, label, action)
        return tensordict
