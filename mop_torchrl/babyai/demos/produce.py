"""Bot demonstrations produced by BabyAI workers and appended to a demo directory.

:func:`generate_demos` lets the BabyAI bot play (the action taken is the bot's label; where the
bot fails, label ``-1``, a seeded random action is taken and the ``-1`` kept) in ``num_workers``
worker processes and hands complete episodes to a
:class:`~mop_torchrl.babyai.demos.writer.DemoWriter`. Three back-ends produce them: plain
gymnasium loops in worker processes (the default, and the fastest), a TorchRL collector, or a
``ParallelEnv`` stepped from this process.
"""

from __future__ import annotations

import functools
import os
import queue
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase

from mop_torchrl.babyai.bot import BotActor
from mop_torchrl.babyai.demos.store import demo_keys, nested
from mop_torchrl.babyai.demos.writer import DemoWriter
from mop_torchrl.babyai.envs import make_babyai_env, worker_seeds
from mop_torchrl.babyai.levels import NUM_ACTIONS, resolve_level

__all__ = ["generate_demos"]


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
            value = chunk.get(nested(key))
        out.set(nested(key), value.to(dtype).reshape(*chunk.batch_size, *shape))
    return out


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
    from mop_torchrl.babyai.wrappers import make_babyai_gym_env

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
                        {nested(k): torch.from_numpy(v) for k, v in episode.items()},
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
    existing ones and are committed by the :mod:`~mop_torchrl.babyai.demos.writer`'s protocol,
    so an interrupted run leaves a usable buffer holding only complete episodes. Re-running on the same ``out``
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
            process.
        ValueError: unknown level or backend, ``episodes < 1`` or ``num_workers < 1``
            (checked before anything is written).

    Examples:
        ``generate_demos("GoToRedBall", 4, out, num_workers=1)`` adds four episodes to
        ``out`` (the CLI's ``demos`` command calls it); arguments are checked first:

        >>> from mop_torchrl.babyai.demos import generate_demos
        >>> generate_demos("GoToRedBall", 4, "demos", backend="threads")
        Traceback (most recent call last):
        ...
        ValueError: backend must be one of ['collector', 'gym', 'parallel_env'], got 'threads'
    """
    if episodes < 1 or num_workers < 1:
        raise ValueError(f"episodes and num_workers must be >= 1, got {episodes}, {num_workers}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, got {backend!r}")
    level = resolve_level(level)
    path = Path(out)
    writer = DemoWriter(path, level)
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
