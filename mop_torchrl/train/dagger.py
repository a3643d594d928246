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

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tensordict import NestedKey, TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl._utils import logger as torchrl_logger
from torchrl.data import LazyTensorStorage, SliceSampler, TensorDictReplayBuffer

__all__ = ["BotMixer", "DaggerDataset", "DumpError", "check_dump", "linear_decay"]


class DumpError(ValueError):
    """A dataset dump that does not fit what :meth:`DaggerDataset.dumps` writes."""


def _not_storage_allocated(record: logging.LogRecord) -> bool:
    """Drops TorchRL's INFO line "Initialized LazyTensorStorage with ... shape", which opened
    every imitation run; every other torchrl record passes."""
    return not (
        record.levelno == logging.INFO
        and str(record.msg).startswith("Initialized LazyTensorStorage with")
    )


if _not_storage_allocated not in torchrl_logger.filters:
    torchrl_logger.addFilter(_not_storage_allocated)


class DaggerDataset:
    """Labelled student rollouts, replayed as ``[batch_slices, burn_in + slice_len]`` slices.

    Args:
        keys: what the loss reads (observations, hidden states, ``is_init``, and for per-level
            routing costs the ``"level"`` index of each step); ``expert_action`` is stored
            beside them.
        frames: capacity in frames; the oldest segments are overwritten first.
        slice_len: loss-bearing steps per slice.
        burn_in: steps before them that only refresh the stored state (labels ``-1``).
        batch_slices: slices per sample.

    :meth:`dumps`/:meth:`loads` save and restore its storage and writer with TorchRL's
    checkpointers (memmaps and JSON; nothing is pickled, so loading a dump runs no code).

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
        """Writes the replay buffer's storage (``storage/``: memmaps, ``meta.json``,
        ``storage_metadata.json``) and writer (``writer/metadata.json``) to ``path``.

        Not ``ReplayBuffer.dumps``: that also pickles the prefetch queue (``prefetch.pkl``),
        which ``loads`` would unpickle; the sampler (a ``SliceSampler``) keeps no state, and the
        batch size comes from the config.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.buffer.storage.dumps(path / "storage")
        self.buffer.writer.dumps(path / "writer")

    def loads(self, path: str | Path) -> None:
        """Restores what :meth:`dumps` wrote (or ``ReplayBuffer.dumps``, whose ``*.pkl`` files
        are ignored), after :func:`check_dump`; reads JSON and memmaps only, copies the rows
        into memory and never writes to ``path``."""
        path = Path(path)
        length, cursor, write_count = check_dump(path, self.buffer.storage.max_size)
        stored = TensorDict.load_memmap(path / "storage", allow_pickle=False)
        self.buffer.storage.load_state_dict(
            {"_storage": stored.state_dict(), "initialized": True, "_len": length}
        )
        self.buffer.writer.load_state_dict({"_cursor": cursor, "_write_count": write_count})
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


def check_dump(path: str | Path, capacity: int | None = None) -> tuple[int, int, int | None]:
    """Checks a dump's layout without loading it; returns its ``(len, cursor, write_count)``.

    Every tensor ``storage/meta.json`` lists (and those of nested tensordicts, in their own
    ``meta.json``) must have its ``.memmap`` file, of exactly the size its shape and dtype
    take (a truncated file would be regrown with zeros on load); nothing but tensors and
    tensordicts is accepted; ``len`` and the writer's cursor must lie within the rows
    (``capacity`` if given).

    Raises:
        DumpError: naming the file at fault (one line).
    """
    storage = Path(path) / "storage"
    rows = _check_tensordict_dir(storage, capacity)
    length = _read_json(storage / "storage_metadata.json").get("len")
    writer = _read_json(Path(path) / "writer" / "metadata.json")
    cursor, count = writer.get("cursor"), writer.get("write_count")
    if not _is_count(length, rows) or not _is_count(cursor, rows - 1):
        raise DumpError(
            f"the buffer dump {str(path)!r} is inconsistent: len {length!r}, cursor {cursor!r}, "
            f"{rows} rows"
        )
    return length, cursor, count if isinstance(count, int) else None


def _check_tensordict_dir(directory: Path, rows: int | None) -> int:
    """Checks one memmapped tensordict directory (recursively); returns its row count."""
    meta_file = directory / "meta.json"
    meta = _read_json(meta_file)
    shape = meta.get("shape")
    if meta.get("_type") != str(TensorDict) or not _is_shape(shape) or len(shape) != 1:
        raise DumpError(f"{str(meta_file)!r} is not a one-dimensional TensorDict")
    if rows is not None and shape[0] != rows:
        raise DumpError(f"{str(meta_file)!r} holds {shape[0]} rows, not {rows}")
    rows = shape[0]
    for key, value in meta.items():
        if key in ("shape", "device", "_type"):
            continue
        if not isinstance(value, dict) or "/" in key or key in ("", ".", ".."):
            raise DumpError(f"{str(meta_file)!r} has an entry {key!r} this dataset never writes")
        if value.get("type") == "TensorDict" and len(value) == 1:
            _check_tensordict_dir(directory / key, rows)
            continue
        dtype = getattr(torch, str(value.get("dtype", "")).removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype) or not _is_shape(value.get("shape")):
            raise DumpError(f"{str(meta_file)!r} lists {key!r} without a tensor shape and dtype")
        if value["shape"][:1] != [rows]:
            raise DumpError(f"{str(meta_file)!r} gives {key!r} {value['shape'][:1]} rows")
        file = directory / f"{key}.memmap"
        expected = math.prod(value["shape"]) * dtype.itemsize
        if not file.is_file():
            raise DumpError(f"{str(file)!r} of the buffer dump is missing")
        if file.stat().st_size != expected:
            raise DumpError(
                f"{str(file)!r} has {file.stat().st_size} bytes, but {key!r} takes {expected}: "
                "the buffer dump is truncated or altered"
            )
    return rows


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise DumpError(f"{str(file)!r} of the buffer dump is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DumpError(f"{str(file)!r} of the buffer dump is unreadable: {err}") from None
    if not isinstance(data, dict):
        raise DumpError(f"{str(file)!r} of the buffer dump is not a JSON object")
    return data


def _is_shape(shape: object) -> bool:
    return isinstance(shape, list) and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    )


def _is_count(value: object, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= most


def linear_decay(start: float, decay_updates: int, update: int) -> float:
    """A schedule's value at ``update``: ``start`` decaying linearly to 0 over
    ``decay_updates`` (constant when ``decay_updates`` is 0). DAgger's β and the learning rate
    follow it; computed from the update index, so a resumed run has no schedule state to restore.

    Examples:
        >>> [linear_decay(0.5, 4, u) for u in (0, 2, 4, 8)], linear_decay(0.3, 0, 100)
        ([0.5, 0.25, 0.0, 0.0], 0.3)
    """
    if decay_updates <= 0:
        return start
    return start * max(0.0, 1.0 - update / decay_updates)


class BotMixer(TensorDictModuleBase):
    """Replaces the student's ``action`` by the bot's label with probability ``beta``.

    Steps where the bot failed (label ``-1``) keep the student's action. Put it after the actor
    in the collection policy; set ``beta`` (e.g. from :func:`dagger_beta`) between batches.
    ``beta`` is kept in a buffer, so it travels with the weights to a collector worker.

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
        self.register_buffer("_beta", torch.tensor(float(beta), dtype=torch.float64))

    @property
    def beta(self) -> float:
        return float(self._beta)

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta.fill_(value)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        if self.beta <= 0:
            return tensordict
        action, label = tensordict["action"], tensordict["expert_action"]
        take = (torch.rand(action.shape) < self.beta) & (label >= 0)
        tensordict["action"] = torch.where(take, label, action)
        return tensordict
