"""The on-disk demo format: keys, metadata, integrity checks, opening and sequence sampling.

On-disk layout (``FORMAT_VERSION`` 1)::

    out/demos.json     committed metadata, replaced atomically (mop_torchrl.io.atomic_write):
                       format_version, level, frames, episodes, capacity, storage, keys
                       ({key: {"shape", "dtype"}}), runs (seed and counts of each generate call)
    out/storage-<k>/   the LazyMemmapStorage scratch dir: a memmapped TensorDict of ``capacity``
                       rows (tensordict's meta.json + one .memmap file per key) and the
                       storage_metadata.json written by ``LazyMemmapStorage.dumps`` when
                       the storage is allocated (its ``len`` is not used: ``demos.json`` says
                       which rows are committed). Opening checks every file's size against
                       ``capacity`` first: a truncated file is a ``DemoError``, never regrown.
    out/lock           flock'ed by a writer, so two writers cannot share a directory

Rows past ``frames`` are uncommitted (a writer killed mid-append left them) and invisible to
readers; see :mod:`mop_torchrl.babyai.demos.writer` for the commit protocol.

Stored keys (one row per step; dtypes compact, :func:`sample_sequences` casts the integer
observations back to ``int64`` as the env produces them):

- ``"image"`` uint8 ``(7, 7, 3)``, ``"direction"`` uint8, ``"carrying"`` uint8, ``"mission"``
  uint8 ``(72,)`` token ids: the observation acted on.
- ``"action"`` int8: the action taken; ``"expert_action"`` int8: the bot's label (``-1``: bot
  failure, a random action was taken).
- ``"is_init"`` bool ``(1,)``: first step of the episode; ``"episode"`` int64: episode id,
  ``0 .. episodes - 1`` in commit order; ``"step"`` int32: step index in the episode.
- ``("next", "reward")`` float32 ``(1,)``, ``("next", "done")``, ``("next", "terminated")``
  bool ``(1,)``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import SliceSampler, TensorDictReplayBuffer, TensorStorage

from mop_torchrl.babyai.tokenizer import MissionTokenizer
from mop_torchrl.io import atomic_write_text

__all__ = [
    "FORMAT_VERSION",
    "META",
    "DemoError",
    "demo_keys",
    "key_meta",
    "load_rows",
    "nested",
    "open_demos",
    "read_meta",
    "sample_sequences",
    "write_meta",
]

#: Version of the on-disk format written in ``demos.json``.
FORMAT_VERSION: int = 1
#: Name of the committed metadata file in a demo directory.
META = "demos.json"

# Keys cast back to int64 when sampled (the env's dtypes, what the policy embeds).
_INT64_KEYS = ("direction", "carrying", "mission", "action", "expert_action", "episode", "step")


class DemoError(ValueError):
    """A demo directory is missing, corrupt, or does not match what was asked for."""


def demo_keys() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Stored keys (``"next.reward"`` for nested ones) with their per-row shape and dtype.

    Examples:
        >>> from mop_torchrl.babyai.demos import demo_keys
        >>> demo_keys()["image"]
        ((7, 7, 3), torch.uint8)
    """
    tok = MissionTokenizer()
    mission_dtype = torch.uint8 if tok.vocab_size <= 256 else torch.int16
    return {
        "image": ((7, 7, 3), torch.uint8),
        "direction": ((), torch.uint8),
        "carrying": ((), torch.uint8),
        "mission": ((tok.max_length,), mission_dtype),
        "action": ((), torch.int8),
        "expert_action": ((), torch.int8),
        "is_init": ((1,), torch.bool),
        "episode": ((), torch.int64),
        "step": ((), torch.int32),
        "next.reward": ((1,), torch.float32),
        "next.done": ((1,), torch.bool),
        "next.terminated": ((1,), torch.bool),
    }


def key_meta() -> dict[str, dict[str, Any]]:
    """:func:`demo_keys` as ``demos.json`` lists them (``{"shape": [...], "dtype": "uint8"}``)."""
    return {
        k: {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
        for k, (shape, dtype) in demo_keys().items()
    }


def nested(key: str) -> str | tuple[str, ...]:
    """A :func:`demo_keys` name as a TensorDict key: ``"next.done"`` -> ``("next", "done")``."""
    parts = tuple(key.split("."))
    return parts if len(parts) > 1 else parts[0]


# ------------------------------------------------------------------------------- metadata
def write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Commits ``meta`` as ``path`` (a directory's ``demos.json``), atomically."""
    atomic_write_text(path, json.dumps(meta, indent=1))


def read_meta(path: Path) -> dict[str, Any]:
    """The committed metadata of demo directory ``path``, checked against this code's format.

    Raises:
        DemoError: missing or corrupt ``demos.json``, another format version or other keys.
    """
    meta_path = path / META
    if not meta_path.is_file():
        raise DemoError(f"{path} is not a demo directory: {META} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DemoError(f"{meta_path} is corrupt: {err}") from None
    required = ("format_version", "level", "frames", "episodes", "capacity", "storage", "keys")
    if not isinstance(meta, dict) or any(k not in meta for k in required):
        missing = [k for k in required if not isinstance(meta, dict) or k not in meta]
        raise DemoError(f"{meta_path} is corrupt: missing fields {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise DemoError(
            f"{meta_path} has format version {meta['format_version']!r}; this code reads "
            f"version {FORMAT_VERSION}"
        )
    if meta["keys"] != key_meta():
        raise DemoError(
            f"{meta_path} lists keys/shapes {meta['keys']} but this code stores {key_meta()}"
        )
    frames, episodes, capacity = meta["frames"], meta["episodes"], meta["capacity"]
    ints = all(isinstance(v, int) and v >= 0 for v in (frames, episodes, capacity))
    if not ints or frames > capacity or episodes > frames:
        raise DemoError(
            f"{meta_path} is corrupt: frames={frames!r}, episodes={episodes!r}, "
            f"capacity={capacity!r}"
        )
    name = meta["storage"]
    if not isinstance(name, str) or not name.startswith("storage-") or "/" in name:
        raise DemoError(f"{meta_path} is corrupt: storage={name!r}")
    return meta


# ----------------------------------------------------------------------------- the storage
def _check_files(sdir: Path, capacity: int) -> None:
    """Every key's ``.memmap`` file exists with exactly ``capacity`` rows' bytes.

    Checked before tensordict opens the files: opening a short file would silently regrow it
    with zeros.
    """
    for key, (shape, dtype) in demo_keys().items():
        file = sdir.joinpath(*key.split(".")).with_suffix(".memmap")
        expected = capacity * math.prod(shape) * dtype.itemsize
        if not file.is_file():
            raise DemoError(f"cannot load the demo storage {sdir}: {file.name} is missing")
        size = file.stat().st_size
        if size != expected:
            raise DemoError(
                f"{file} has {size} bytes, but {capacity} rows of {key!r} take {expected}: "
                "the demo storage is truncated or corrupt"
            )


def _check_storage(td: TensorDictBase, meta: dict[str, Any], where: Path) -> None:
    if td.batch_size[:1] != torch.Size([meta["capacity"]]):
        raise DemoError(
            f"{where} holds {tuple(td.batch_size)} rows, but {META} says capacity "
            f"{meta['capacity']}"
        )
    for key, (shape, dtype) in demo_keys().items():
        value = td.get(nested(key), None)
        if value is None:
            raise DemoError(f"{where} lacks key {key!r}")
        if tuple(value.shape[1:]) != shape or value.dtype != dtype:
            raise DemoError(
                f"{where}: key {key!r} has shape {tuple(value.shape[1:])} and dtype "
                f"{value.dtype}, expected {shape} and {dtype}"
            )
    frames, episodes = meta["frames"], meta["episodes"]
    if frames and int(td["episode"][frames - 1]) != episodes - 1:
        raise DemoError(
            f"{where}: the last committed frame belongs to episode "
            f"{int(td['episode'][frames - 1])}, but {META} says {episodes} episodes"
        )


def load_rows(path: Path, meta: dict[str, Any]) -> TensorDictBase:
    """The storage's memory-mapped rows, checked against ``meta`` (nothing is written).

    Raises:
        DemoError: a missing, truncated or mismatched storage file.
    """
    sdir = path / meta["storage"]
    _check_files(sdir, meta["capacity"])
    try:
        td = TensorDict.load_memmap(sdir)
    except Exception as err:  # missing files, garbled tensordict metadata
        raise DemoError(f"cannot load the demo storage {sdir}: {err}") from None
    _check_storage(td, meta, sdir)
    return td


# -------------------------------------------------------------------------------- reading
def open_demos(path: str | os.PathLike) -> tuple[TensorDictReplayBuffer, dict[str, Any]]:
    """Opens the committed frames of a demo directory (memory-mapped, nothing is copied).

    The buffer's storage is a :class:`~torchrl.data.TensorStorage` over the first
    ``meta["frames"]`` rows of the memmapped data (uncommitted rows are invisible); its sampler
    is a :class:`~torchrl.data.SliceSampler` over ``"episode"``, which
    :func:`sample_sequences` adapts to the requested slice length.

    Returns:
        ``(buffer, meta)``; ``meta`` holds ``level``, ``frames``, ``episodes``, ``keys`` ...

    Raises:
        DemoError: missing, corrupt or incompatible directory (the message names the problem).

    Examples:
        >>> import tempfile
        >>> from mop_torchrl.babyai.demos import DemoError, open_demos
        >>> try:
        ...     open_demos(tempfile.mkdtemp())
        ... except DemoError as err:
        ...     print(str(err).split(": ")[-1])
        demos.json is missing
    """
    path = Path(path)
    meta = read_meta(path)
    if meta["frames"] == 0:
        raise DemoError(f"{path} holds no committed episodes yet")
    td = load_rows(path, meta)
    storage = TensorStorage(td[: meta["frames"]])
    buffer = TensorDictReplayBuffer(storage=storage, sampler=_slice_sampler(1), batch_size=None)
    return buffer, meta


def _slice_sampler(slice_len: int) -> SliceSampler:
    return SliceSampler(
        slice_len=slice_len,
        traj_key="episode",
        strict_length=False,
        pad_output=True,
        cache_values=True,
    )


def sample_sequences(
    buffer: TensorDictReplayBuffer, batch_slices: int, slice_len: int
) -> TensorDictBase:
    """Samples ``[batch_slices, slice_len]`` sequences, each within one episode.

    Episodes are drawn uniformly, then a window of ``min(slice_len, episode length)`` steps
    uniformly within the episode (:class:`~torchrl.data.SliceSampler` with
    ``strict_length=False``). A slice is never longer than its episode: shorter ones (BabyAI
    bot episodes are often shorter than ``slice_len``) are padded at the END up to
    ``slice_len``. Padded steps repeat the last real step's observation with
    ``expert_action = -1`` (ignored by the loss), ``is_init = False``, ``episode = -1`` and
    ``("collector", "mask") = False``; since they come after every real step they cannot affect
    the real steps' outputs of a causal recurrent model. ``is_init`` is ``True`` exactly at
    each slice's first step (a slice starting mid-episode restarts the recurrent state from
    zero). Integer observations are returned as ``int64``. Deterministic given torch's global
    seed.

    ``buffer`` is what :func:`open_demos` returns, or any replay buffer of rows with the
    :func:`demo_keys` (here two episodes of 3 and 2 steps, kept in memory):

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
        >>> from mop_torchrl.babyai.demos import demo_keys, sample_sequences
        >>> rows = TensorDict(
        ...     {k: torch.zeros(5, *shape, dtype=dtype) for k, (shape, dtype) in demo_keys().items()},
        ...     [5],
        ... ).unflatten_keys(".")
        >>> rows["episode"] = torch.tensor([0, 0, 0, 1, 1])
        >>> buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(5))
        >>> _ = buffer.extend(rows)
        >>> td = sample_sequences(buffer, batch_slices=3, slice_len=4)
        >>> td.shape, bool(td["is_init"][:, 0].all()), td["mission"].dtype
        (torch.Size([3, 4]), True, torch.int64)
        >>> td["collector", "mask"].sum(-1).tolist() == td["episode"].ne(-1).sum(-1).tolist()
        True
    """
    if batch_slices < 1 or slice_len < 1:
        raise ValueError(
            f"batch_slices and slice_len must be >= 1, got {batch_slices}, {slice_len}"
        )
    sampler = buffer.sampler
    if not isinstance(sampler, SliceSampler) or sampler.slice_len != slice_len:
        buffer.set_sampler(_slice_sampler(slice_len))
    flat = buffer.sample(batch_slices * slice_len)
    td = flat.reshape(batch_slices, slice_len)
    mask = td.get(("collector", "mask"), None)  # absent when no slice needed padding
    if mask is None:
        mask = torch.ones(batch_slices, slice_len, dtype=torch.bool)
    out = td.exclude("index")
    out.set(("collector", "mask"), mask)
    for key in _INT64_KEYS:
        out.set(key, td.get(key).long())
    pad = ~mask
    out["expert_action"] = out["expert_action"].masked_fill(pad, -1)
    out["episode"] = out["episode"].masked_fill(pad, -1)
    out["is_init"] = out["is_init"].masked_fill(pad.unsqueeze(-1), False)
    return out
