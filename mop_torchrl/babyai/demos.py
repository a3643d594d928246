"""BabyAI bot demonstrations in an on-disk TorchRL replay buffer.

:func:`generate_demos` lets the BabyAI bot play (the action taken is the bot's label; where the
bot fails, label ``-1``, a seeded random action is taken and the ``-1`` kept) in ``num_workers``
worker processes (plain gymnasium loops by default, or a TorchRL collector / ``ParallelEnv``)
and writes complete episodes, one frame per row, to a
:class:`~torchrl.data.LazyMemmapStorage` under ``out``. :func:`open_demos` reopens the committed
frames as a :class:`~torchrl.data.TensorDictReplayBuffer` and :func:`sample_sequences` draws
``[batch_slices, slice_len]`` sequences for recurrent behaviour cloning with a
:class:`~torchrl.data.SliceSampler` (``traj_key="episode"``).

On-disk layout (``FORMAT_VERSION`` 1)::

    out/demos.json     committed metadata, replaced atomically (write temp, fsync, os.replace):
                       format_version, level, frames, episodes, capacity, storage, keys
                       ({key: {"shape", "dtype"}}), runs (seed and counts of each generate call)
    out/storage-<k>/   the LazyMemmapStorage scratch dir: a memmapped TensorDict of ``capacity``
                       rows (tensordict's meta.json + one .memmap file per key) and the
                       storage_metadata.json written by ``LazyMemmapStorage.dumps`` when
                       the storage is allocated (its ``len`` is not used: ``demos.json`` says
                       which rows are committed). Opening checks every file's size against
                       ``capacity`` first: a truncated file is a ``DemoError``, never regrown.
    out/lock           flock'ed by a writer, so two writers cannot share a directory

Commit protocol: episodes are kept in memory per env until they end; complete episodes are
written to rows ``[frames, frames + n)`` (past the committed length) and only then is
``demos.json`` atomically replaced with the new ``frames``/``episodes``. A kill at any moment
leaves the previous ``demos.json`` pointing at fully written rows; rows past ``frames`` are
ignored by readers and overwritten by the next append. When the storage is full it is copied
into a fresh ``storage-<k+1>`` of about twice the capacity, committed, and the old one removed
(stray ``storage-*`` dirs from an interrupted growth are removed by the next writer). Data
written through ``mmap`` survives a killed process; it is not fsync'ed against power loss.

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

import contextlib
import fcntl
import functools
import json
import math
import os
import queue
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import (
    LazyMemmapStorage,
    SliceSampler,
    TensorDictReplayBuffer,
    TensorStorage,
)

from mop_torchrl.babyai.bot import BotActor
from mop_torchrl.babyai.envs import make_babyai_env, worker_seeds
from mop_torchrl.babyai.levels import NUM_ACTIONS, resolve_level
from mop_torchrl.babyai.tokenizer import MissionTokenizer

__all__ = [
    "FORMAT_VERSION",
    "BotActor",
    "DemoError",
    "demo_keys",
    "generate_demos",
    "open_demos",
    "sample_sequences",
]

#: Version of the on-disk format written in ``demos.json``.
FORMAT_VERSION: int = 1

_META = "demos.json"
_LOCK = "lock"
_COPY_ROWS = 65_536  # rows per copy when the storage grows
_MIN_CAPACITY = 1024


class DemoError(ValueError):
    """A demo directory is missing, corrupt, or does not match what was asked for."""


# ---------------------------------------------------------------------------------- schema
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


# Keys cast back to int64 when sampled (the env's dtypes, what the policy embeds).
_INT64_KEYS = ("direction", "carrying", "mission", "action", "expert_action", "episode", "step")


def _key_meta() -> dict[str, dict[str, Any]]:
    return {
        k: {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
        for k, (shape, dtype) in demo_keys().items()
    }


def _nested(key: str) -> str | tuple[str, ...]:
    parts = tuple(key.split("."))
    return parts if len(parts) > 1 else parts[0]


def _to_rows(chunk: TensorDictBase) -> TensorDict:
    """Env/collector output ``[*B]`` to the compact stored layout (``episode`` left at 0)."""
    schema = demo_keys()
    out = TensorDict(batch_size=chunk.batch_size)
    src = {
        "step": chunk["step_count"].squeeze(-1),
        "episode": torch.zeros(chunk.batch_size, dtype=torch.int64),
    }
    for key, (shape, dtype) in schema.items():
        value = src.get(key)
        if value is None:
            value = chunk.get(_nested(key))
        out.set(_nested(key), value.to(dtype).reshape(*chunk.batch_size, *shape))
    return out


# -------------------------------------------------------------------------- metadata I/O
def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically replace ``path`` with ``data`` (temp file, fsync, ``os.replace``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / _META
    if not meta_path.is_file():
        raise DemoError(f"{path} is not a demo directory: {_META} is missing")
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
    if meta["keys"] != _key_meta():
        raise DemoError(
            f"{meta_path} lists keys/shapes {meta['keys']} but this code stores {_key_meta()}"
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


def _check_storage(td: TensorDictBase, meta: dict[str, Any], where: Path) -> None:
    if td.batch_size[:1] != torch.Size([meta["capacity"]]):
        raise DemoError(
            f"{where} holds {tuple(td.batch_size)} rows, but {_META} says capacity "
            f"{meta['capacity']}"
        )
    for key, (shape, dtype) in demo_keys().items():
        value = td.get(_nested(key), None)
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
            f"{int(td['episode'][frames - 1])}, but {_META} says {episodes} episodes"
        )


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


def _load_storage_td(path: Path, meta: dict[str, Any]) -> TensorDictBase:
    """The storage's memory-mapped rows, checked against ``demos.json`` (nothing is written)."""
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
        >>> from mop_torchrl.babyai.demos import generate_demos, open_demos, sample_sequences
        >>> out = tempfile.mkdtemp()
        >>> _ = generate_demos("GoToRedBall", 4, out, num_workers=1, progress=False)
        >>> buffer, meta = open_demos(out)
        >>> meta["episodes"], len(buffer) == meta["frames"]
        (4, True)
    """
    path = Path(path)
    meta = _read_meta(path)
    if meta["frames"] == 0:
        raise DemoError(f"{path} holds no committed episodes yet")
    td = _load_storage_td(path, meta)
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

    Examples:
        >>> import tempfile, torch
        >>> from mop_torchrl.babyai.demos import generate_demos, open_demos, sample_sequences
        >>> out = tempfile.mkdtemp()
        >>> _ = generate_demos("GoToRedBall", 4, out, num_workers=1, progress=False)
        >>> buffer, _ = open_demos(out)
        >>> td = sample_sequences(buffer, batch_slices=3, slice_len=8)
        >>> td.shape, bool(td["is_init"][:, 0].all()), td["mission"].dtype
        (torch.Size([3, 8]), True, torch.int64)
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


# -------------------------------------------------------------------------------- writing
def _collector_chunks(
    level: str, num_workers: int, run_seed: int, act_seeds: list[int], chunk_len: int
) -> Iterator[TensorDictBase]:
    """``[num_workers, chunk_len]`` batches from TorchRL collectors (one env per worker)."""
    from torchrl.collectors import Collector, MultiSyncCollector

    envs = [
        functools.partial(make_babyai_env, level, 1, s, True)
        for s in worker_seeds(run_seed, num_workers)
    ]
    if num_workers == 1:  # no subprocess: env and bot run in this process
        collector = Collector(
            envs[0](), BotActor(act_seeds[0]), frames_per_batch=chunk_len, total_frames=-1
        )
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # policy_factory without a weight updater
            collector = MultiSyncCollector(
                envs,
                policy_factory=[functools.partial(BotActor, s) for s in act_seeds],
                frames_per_batch=chunk_len * num_workers,
                total_frames=-1,
                cat_results="stack",
            )
    try:
        for data in collector:
            yield data.reshape(num_workers, chunk_len)
    finally:
        collector.shutdown()


def _parallel_env_chunks(
    level: str, num_workers: int, run_seed: int, act_seeds: list[int], chunk_len: int
) -> Iterator[TensorDictBase]:
    """``[num_workers, chunk_len]`` batches from a ``ParallelEnv`` stepped by this process."""
    env = make_babyai_env(level, num_workers, run_seed, expert=True, parallel=True)
    policy = BotActor(act_seeds[0])
    try:
        td = env.reset()
        while True:
            steps = []
            for _ in range(chunk_len):
                out, td = env.step_and_maybe_reset(policy(td))
                steps.append(out)
            yield torch.stack(steps, -1).reshape(num_workers, chunk_len)
    finally:
        env.close()


def _gym_worker(
    level: str, env_seed: int, act_seed: int, episodes: Any, stop: Any
) -> None:  # pragma: no cover - runs in a subprocess
    """Plays bot episodes in a plain gymnasium loop; puts each one (numpy rows) on a queue."""
    import queue as queue_module
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    from mop_torchrl.babyai.envs import make_babyai_gym_env

    schema = demo_keys()
    dtypes = {k: str(dtype).removeprefix("torch.") for k, (_, dtype) in schema.items()}
    env = make_babyai_gym_env(level, seed=env_seed, expert=True)
    rng = np.random.default_rng(act_seed)
    parent = os.getppid()

    def running() -> bool:  # stop when asked to, or when the parent died (kill -9)
        return not stop.is_set() and os.getppid() == parent

    # On exit, don't wait for queued episodes to reach a parent that stopped reading.
    episodes.cancel_join_thread()
    while running():
        obs, _ = env.reset()
        rows: dict[str, list[Any]] = {k: [] for k in schema}
        done, step = False, 0
        while not done:
            label = int(obs["expert_action"])
            noise = int(rng.integers(NUM_ACTIONS))  # drawn every step: a fixed stream
            action = label if label >= 0 else noise
            for key in ("image", "direction", "carrying", "mission", "expert_action"):
                rows[key].append(obs[key])
            rows["action"].append(action)
            rows["is_init"].append([step == 0])
            rows["step"].append(step)
            obs, reward, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
            rows["next.reward"].append([reward])
            rows["next.done"].append([done])
            rows["next.terminated"].append([terminated])
            step += 1
        rows["episode"] = [0] * step
        episode = {k: np.asarray(v, dtype=dtypes[k]) for k, v in rows.items()}
        while running():
            try:
                episodes.put(episode, timeout=0.2)
                break
            except queue_module.Full:
                continue


def _gym_chunks(
    level: str, num_workers: int, run_seed: int, act_seeds: list[int], chunk_len: int
) -> Iterator[list[TensorDictBase]]:
    """Complete episodes from ``num_workers`` processes running the bot in gymnasium loops.

    Episodes are taken round-robin from the workers, so the output does not depend on timing.
    """
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # workers only run numpy/gymnasium code
    stop = ctx.Event()
    queues = [ctx.Queue(maxsize=64) for _ in range(num_workers)]
    procs = [
        ctx.Process(target=_gym_worker, args=(level, s, a, q, stop), daemon=True, name=f"demos-{i}")
        for i, (s, a, q) in enumerate(zip(worker_seeds(run_seed, num_workers), act_seeds, queues))
    ]
    for proc in procs:
        proc.start()
    try:
        batch: list[TensorDictBase] = []
        while True:
            for q, proc in zip(queues, procs):
                while True:
                    try:
                        episode = q.get(timeout=1.0)
                        break
                    except queue.Empty:  # check the worker is alive
                        if not proc.is_alive():
                            raise RuntimeError(
                                f"demo worker {proc.name} died (exit code {proc.exitcode})"
                            ) from None
                batch.append(
                    TensorDict(
                        {_nested(k): torch.from_numpy(v) for k, v in episode.items()},
                        batch_size=[len(episode["step"])],
                    )
                )
            if sum(ep.shape[0] for ep in batch) >= chunk_len * num_workers:
                yield batch
                batch = []
    finally:
        stop.set()
        for proc in procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for q in queues:
            q.cancel_join_thread()
            q.close()


_BACKENDS: dict[str, Callable[..., Iterator[TensorDictBase]]] = {
    "collector": _collector_chunks,
    "parallel_env": _parallel_env_chunks,
    "gym": _gym_chunks,
}


class _Writer:
    """Owns a demo directory while generating: storage, growth and the commit protocol."""

    def __init__(self, path: Path, level: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._lock = open(path / _LOCK, "w")  # noqa: SIM115  (held for the writer's life)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise DemoError(f"another process is writing demos to {path}") from None
        if (path / _META).exists():
            self.meta = _read_meta(path)
            if self.meta["level"] != level:
                self.close()
                raise DemoError(
                    f"{path} holds demos of {self.meta['level']}; cannot append {level}"
                )
            self.rows = _load_storage_td(path, self.meta)  # validated before any write
        else:
            stray = [p.name for p in path.iterdir() if not self._ours(p)]
            if stray:
                self.close()
                raise DemoError(
                    f"{path} is not empty and has no {_META}: refusing to write demos there "
                    f"(found {sorted(stray)[:5]})"
                )
            self.meta = {
                "format_version": FORMAT_VERSION,
                "level": level,
                "frames": 0,
                "episodes": 0,
                "capacity": 0,
                "storage": "storage-0",
                "keys": _key_meta(),
                "runs": [],
            }
            self.rows = None
        self._remove_stray_storages()

    @staticmethod
    def _ours(p: Path) -> bool:
        return p.name in (_LOCK, f".{_META}.tmp") or p.name.startswith("storage-")

    def _remove_stray_storages(self) -> None:
        for p in self.path.glob("storage-*"):
            if p.name != self.meta["storage"] or self.rows is None:
                shutil.rmtree(p, ignore_errors=True)

    def _new_storage(self, capacity: int, template: TensorDictBase) -> None:
        """Copies the committed rows into a fresh storage of ``capacity`` rows and commits it."""
        index = int(self.meta["storage"].split("-")[1]) + (self.rows is not None)
        name = f"storage-{index}"
        sdir = self.path / name
        shutil.rmtree(sdir, ignore_errors=True)
        storage = LazyMemmapStorage(capacity, scratch_dir=sdir, existsok=True)
        storage.set(0, template[0])  # allocates every key's memmap file
        storage.dumps(sdir)
        # Rows are read and written through the memory-mapped TensorDict, by index: the
        # storage's own length counter is not what is committed (and is not reloaded right).
        rows = TensorDict.load_memmap(sdir)
        frames = self.meta["frames"]
        if self.rows is not None:
            for start in range(0, frames, _COPY_ROWS):
                stop = min(start + _COPY_ROWS, frames)
                rows[start:stop] = self.rows[start:stop]
        old = self.path / self.meta["storage"] if self.rows is not None else None
        self.rows = rows
        self.commit(capacity=capacity, storage=name)
        if old is not None and old != sdir:
            shutil.rmtree(old, ignore_errors=True)

    def write(self, episodes: list[TensorDictBase], expected_len: float) -> None:
        """Writes complete episodes after the committed rows, then commits them."""
        rows = torch.cat(episodes)
        first = self.meta["episodes"]
        ids = torch.repeat_interleave(
            torch.arange(first, first + len(episodes)),
            torch.tensor([ep.shape[0] for ep in episodes]),
        )
        rows.set("episode", ids)
        start, n = self.meta["frames"], rows.shape[0]
        if self.rows is None or start + n > self.meta["capacity"]:
            want = max(
                2 * self.meta["capacity"], math.ceil(start + n + expected_len), _MIN_CAPACITY
            )
            self._new_storage(want, rows)
        self.rows[start : start + n] = rows
        self.meta["runs"][-1]["episodes"] += len(episodes)
        self.meta["runs"][-1]["frames"] += n
        self.commit(frames=start + n, episodes=first + len(episodes))

    def commit(self, **updates: Any) -> None:
        meta = {**self.meta, **updates}
        _write_json(self.path / _META, meta)
        self.meta = meta

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


def _split_episodes(
    chunk: TensorDictBase, partial: list[list[TensorDictBase]]
) -> list[TensorDictBase]:
    """Complete episodes of a ``[num_envs, T]`` batch; unfinished tails go to ``partial``."""
    rows = _to_rows(chunk)
    num_envs, steps = chunk.batch_size
    ends = chunk["next", "done"].reshape(num_envs, steps)
    complete = []
    for w in range(num_envs):
        begin = 0
        for end in (ends[w].nonzero().squeeze(-1) + 1).tolist():
            complete.append(torch.cat([*partial[w], rows[w, begin:end]]))
            partial[w] = []
            begin = end
        if begin < steps:
            partial[w].append(rows[w, begin:])
    return complete


def generate_demos(
    level: str,
    episodes: int,
    out: str | os.PathLike,
    num_workers: int = 2,
    seed: int = 0,
    progress: bool = True,
    backend: Literal["gym", "collector", "parallel_env"] = "gym",
    chunk_len: int = 128,
) -> dict[str, Any]:
    """Generates ``episodes`` complete bot episodes and appends them to the buffer at ``out``.

    The bot acts (action = its label ``expert_action``; where it fails, label ``-1``, a seeded
    random action is taken and the ``-1`` kept). Each of the ``num_workers`` envs keeps its
    current episode in memory until it ends; complete episodes get consecutive ids after the
    existing ones and are committed as described in the module docstring, so an interrupted
    run leaves a usable buffer holding only complete episodes. Re-running on the same ``out``
    appends: the env seeds derive from ``(seed, existing episode count)``, so new episodes do
    not replay earlier seeds.

    Args:
        level (str): BabyAI level (short or full id).
        episodes (int): number of episodes to add.
        out (path): demo directory (created if missing; must hold the same level to append).
        num_workers (int, optional): worker processes, one env each. Defaults to ``2``.
        seed (int, optional): base seed. Defaults to ``0``.
        progress (bool, optional): print progress to stderr. Defaults to ``True``.
        backend (str, optional): ``"gym"``: ``num_workers`` processes each play the bot in a
            plain gymnasium loop and send complete episodes (taken round-robin, so the result
            does not depend on timing); ``"collector"``: a TorchRL ``MultiSyncCollector`` whose
            workers step a TorchRL env with :class:`BotActor` (in-process ``Collector`` for one
            worker); ``"parallel_env"``: a ``ParallelEnv`` stepped from this process. Measured
            on 2 cores (``benchmarks/bench_demos.py``, GoToLocal) the TorchRL per-step
            overhead makes the collector 3-4x slower than the gymnasium workers. Defaults to
            ``"gym"``.
        chunk_len (int, optional): frames per worker between commits (steps per env per
            collected batch for the TorchRL backends). Defaults to ``128``.

    Returns:
        a summary dict: ``level``, ``path``, ``episodes``/``frames`` added,
        ``total_episodes``/``total_frames``, ``seconds``, ``steps_per_s`` (frames over
        ``seconds``, worker start-up included), ``startup_s`` (until the first episodes were
        committed), ``steady_steps_per_s`` (after that), ``success_rate``,
        ``bot_failure_labels`` (frames labelled ``-1``).

    Raises:
        DemoError: ``out`` holds another level, is corrupt, or is being written by another
            process. ValueError: unknown level, ``episodes < 1`` or ``num_workers < 1``.

    Examples:
        >>> import tempfile
        >>> from mop_torchrl.babyai.demos import generate_demos
        >>> out = tempfile.mkdtemp()
        >>> summary = generate_demos("GoToRedBall", 4, out, num_workers=1, progress=False)
        >>> summary["episodes"], summary["total_episodes"]
        (4, 4)
    """
    if episodes < 1 or num_workers < 1:
        raise ValueError(f"episodes and num_workers must be >= 1, got {episodes}, {num_workers}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, got {backend!r}")
    level = resolve_level(level)
    path = Path(out)
    writer = _Writer(path, level)
    try:
        start_episodes, start_frames = writer.meta["episodes"], writer.meta["frames"]
        run_seed = int(
            np.random.SeedSequence([seed, start_episodes]).generate_state(1, dtype=np.uint32)[0]
        )
        act_seeds = worker_seeds(run_seed + 1, num_workers)
        writer.meta["runs"] = [
            *writer.meta.get("runs", []),
            {"seed": seed, "workers": num_workers, "first_episode": start_episodes,
             "episodes": 0, "frames": 0},
        ]  # fmt: skip
        partial: list[list[TensorDictBase]] = [[] for _ in range(num_workers)]
        done_eps = frames = successes = failures = 0
        t0 = last_print = time.perf_counter()
        t_first, frames_first = None, 0
        chunks = _BACKENDS[backend](level, num_workers, run_seed, act_seeds, chunk_len)
        try:
            for chunk in chunks:
                # the "gym" backend yields complete episodes, the others [num_envs, T] batches
                complete = chunk if isinstance(chunk, list) else _split_episodes(chunk, partial)
                complete = complete[: episodes - done_eps]
                if not complete:
                    continue
                done_eps += len(complete)
                frames += sum(ep.shape[0] for ep in complete)
                successes += sum(
                    bool(ep["next", "terminated"][-1]) and float(ep["next", "reward"][-1]) > 0
                    for ep in complete
                )
                failures += sum(int((ep["expert_action"] < 0).sum()) for ep in complete)
                if t_first is None:  # workers are up: steady-state timing starts here
                    t_first, frames_first = time.perf_counter(), frames
                mean_len = frames / done_eps
                writer.write(complete, expected_len=mean_len * (episodes - done_eps) * 1.1)
                now = time.perf_counter()
                if progress and (now - last_print > 2 or done_eps == episodes):
                    last_print = now
                    print(
                        f"demos: {done_eps}/{episodes} episodes, {frames} frames, "
                        f"{frames / (now - t0):.0f} steps/s",
                        file=sys.stderr,
                    )
                if done_eps >= episodes:
                    break
        finally:
            chunks.close()
        t_end = time.perf_counter()
        seconds = t_end - t0
    finally:
        writer.close()
    return {
        "level": level,
        "path": str(path),
        "episodes": done_eps,
        "frames": frames,
        "total_episodes": start_episodes + done_eps,
        "total_frames": start_frames + frames,
        "seconds": seconds,
        "steps_per_s": frames / seconds if seconds > 0 else float("nan"),
        "startup_s": (t_first - t0) if t_first is not None else float("nan"),
        "steady_steps_per_s": (
            (frames - frames_first) / (t_end - t_first)
            if t_first is not None and t_end > t_first and frames > frames_first
            else float("nan")
        ),
        "success_rate": successes / max(done_eps, 1),
        "bot_failure_labels": failures,
    }
