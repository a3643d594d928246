"""Where training data comes from: env factories and the TorchRL collector for a config.

Collection is split into segments that end at checkpoint boundaries; each segment builds fresh
envs seeded from ``(seed, segment)``, so a resumed run sees exactly the data an uninterrupted
run would have seen.

``config.backend`` picks one of TorchRL's collector backends (no home-made distribution layer):

- ``"inprocess"``: :class:`~torchrl.collectors.Collector` stepping all ``num_envs`` envs in the
  learner's process.
- ``"multiprocess"``: :class:`~torchrl.collectors.MultiSyncCollector`, ``num_workers`` local
  processes.
- ``"distributed"``: :class:`~torchrl.collectors.distributed.DistributedCollector` over
  ``torch.distributed`` (gloo), its workers started by ``multiprocessing`` (``launcher="mp"``,
  one machine) or by submitit on SLURM (``launcher="submitit"``, many machines).
- ``"ray"``: :class:`~torchrl.collectors.distributed.RayCollector` on a Ray cluster (the
  optional ``ray`` dependency).

Every multi-worker backend runs ``num_workers`` sub-collectors of ``num_envs // num_workers``
envs each, synchronously: an update always gets one ``[num_envs / num_workers, unroll_len]``
block from every worker, stacked, and :func:`segment_batches` flattens the worker dimension, so
row ``i`` of a batch is always env ``i``'s consecutive steps (the loss replays rows as
sequences). Each worker's envs keep their own recurrent states (TorchRL's primer, registered in
the worker by ``auto_register_policy_transforms``) and their own bots label their own steps.

Workers build the policy with :func:`policy_factory` (the config's architecture); the learner's
weights are pushed through TorchRL's weight-sync schemes when a segment starts and after every
optimizer update, before the next batch is requested (:func:`push_weights`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence

import torch
from tensordict import LazyStackedTensorDict, TensorDict, TensorDictBase
from tensordict.nn import InteractionType
from torch import nn
from torchrl.collectors import BaseCollector, Collector, MultiSyncCollector
from torchrl.envs import EnvBase

from mop_torchrl.babyai.envs import keep_num_threads, make_babyai_env, worker_seeds
from mop_torchrl.train.config import TrainConfig

__all__ = [
    "SLURM_ENV_VAR",
    "env_factories",
    "env_factory",
    "make_collector",
    "policy_factory",
    "push_weights",
    "segment_batches",
]

SLURM_ENV_VAR = "MOP_TORCHRL_SLURM"
"""Environment variable holding a JSON dict of submitit/SLURM options for
``backend="distributed", distributed_launcher="submitit"`` (e.g. ``slurm_partition``,
``timeout_min``, ``slurm_cpus_per_task``); merged over :data:`SLURM_DEFAULTS`."""

SLURM_DEFAULTS: dict[str, object] = {"timeout_min": 24 * 60, "slurm_cpus_per_task": 1}
"""Our submitit defaults (TorchRL's own default is a 10-minute job on partition "train")."""


def env_factory(
    config: TrainConfig, expert: bool, seed: int, num_envs: int | None = None
) -> Callable[[], EnvBase]:
    """A picklable function building the config's batched BabyAI env.

    With ``expert=True`` the bot labels every step and measures its own solution length from
    each start (for the path ratio). ``num_envs`` defaults to ``config.num_envs``.
    """
    return functools.partial(
        make_babyai_env,
        config.task_id,
        num_envs=config.num_envs if num_envs is None else num_envs,
        seed=seed,
        expert=expert,
        parallel=config.env_batching == "parallel",
        path_ratio=expert,
        level_weights=config.level_weights,
    )


def env_factories(config: TrainConfig, expert: bool, seed: int) -> list[Callable[[], EnvBase]]:
    """One env factory per worker, each with ``num_envs // num_workers`` envs.

    One worker gets ``seed`` itself (so one worker sees the in-process backend's envs);
    several get distinct seeds derived from it.
    """
    if config.num_workers == 1:
        return [env_factory(config, expert, seed)]
    per_worker = config.num_envs // config.num_workers
    return [
        env_factory(config, expert, worker_seed, per_worker)
        for worker_seed in worker_seeds(seed, config.num_workers)
    ]


def _build_actor(config: TrainConfig) -> nn.Module:
    torch.set_num_threads(config.torch_threads)
    from mop_torchrl.train.policy import build_policy

    return build_policy(config)[0].eval()


def policy_factory(config: TrainConfig) -> Callable[[], nn.Module]:
    """A picklable function building, in a worker, the actor ``config`` describes (eval mode).

    Its weights are placeholders: the learner's are pushed before the first batch.
    """
    return functools.partial(_build_actor, config)


def make_collector(
    config: TrainConfig,
    actor: nn.Module,
    create_envs: Sequence[Callable[[], EnvBase]],
    total_frames: int,
    exploration: InteractionType,
) -> BaseCollector:
    """A collector yielding ``num_envs × unroll_len`` frames per batch with ``config.backend``.

    Args:
        config (TrainConfig): the run's settings (``backend``, ``num_workers``,
            ``distributed_launcher``, ``num_envs``, ``unroll_len``).
        actor (nn.Module): the learner's actor. In-process it is the collection policy; the
            other backends build their own copy in each worker (:func:`policy_factory`) and use
            ``actor`` only as the source of the weights :func:`push_weights` sends.
        create_envs (list of callables): one env factory per worker (:func:`env_factories`;
            the in-process backend is one worker).
        total_frames (int): frames to collect before the iterator stops.
        exploration (InteractionType): the policy's interaction type while collecting.

    Returns:
        a collector whose batches hold every worker's ``[num_envs / num_workers,
        unroll_len]`` block (worker dimension first); see :func:`segment_batches`.
    """
    frames = config.num_envs * config.unroll_len
    if config.backend == "inprocess":
        if len(create_envs) != 1:
            raise ValueError("the in-process backend takes one env factory")
        return Collector(
            create_envs[0](),
            actor,
            frames_per_batch=frames,
            total_frames=total_frames,
            exploration_type=exploration,
            auto_register_policy_transforms=True,
        )
    if len(create_envs) != config.num_workers:
        raise ValueError(
            f"got {len(create_envs)} env factories for num_workers={config.num_workers}"
        )
    factory = policy_factory(config)
    if config.backend == "multiprocess":
        from torchrl.weight_update import MultiProcessWeightSyncScheme

        return MultiSyncCollector(
            create_envs,
            policy=actor,  # weight source only: the workers run factory()'s policy
            policy_factory=factory,
            frames_per_batch=frames,
            total_frames=total_frames,
            exploration_type=exploration,
            cat_results="stack",
            auto_register_policy_transforms=True,
            weight_sync_schemes={"policy": MultiProcessWeightSyncScheme()},
            num_threads=config.torch_threads,
            num_sub_threads=config.torch_threads,
        )
    worker_kwargs = {"auto_register_policy_transforms": True}
    if config.backend == "distributed":
        from torchrl.collectors.distributed import DistributedCollector

        launcher = config.distributed_launcher
        slurm_kwargs = None
        if launcher == "submitit":
            slurm_kwargs = {**SLURM_DEFAULTS, **json.loads(os.environ.get(SLURM_ENV_VAR, "{}"))}
        return DistributedCollector(
            create_envs,
            policy=actor,  # weight source only: the workers run factory()'s policy
            policy_factory=factory,
            frames_per_batch=frames,
            total_frames=total_frames,
            exploration_type=exploration,
            collector_class=Collector,
            collector_kwargs=worker_kwargs,
            sync=True,
            backend="gloo",
            launcher=launcher,
            slurm_kwargs=slurm_kwargs,
            tcp_port=_free_port() if launcher == "mp" else None,
        )
    if config.backend == "ray":
        import warnings

        from torchrl.collectors.distributed import RayCollector
        from torchrl.collectors.distributed.ray import DEFAULT_RAY_INIT_CONFIG

        # Joins the cluster RAY_ADDRESS names; without it, a fresh local Ray ("local": never a
        # cluster that happens to run on this machine). The workers' torchrl logger is set to
        # worker_log_level (warnings still reach the driver).
        level = config.worker_log_level
        ray_init = {**DEFAULT_RAY_INIT_CONFIG, "logging_level": level}
        ray_init["address"] = os.environ.get("RAY_ADDRESS") or "local"
        ray_init["runtime_env"] = {"env_vars": {"RL_LOGGING_LEVEL": level.upper()}}
        with warnings.catch_warnings(), _keep_signal_handlers():
            # False here: push_weights sends the weights (policy_factory, no local policy).
            warnings.filterwarnings("ignore", message=_RAY_NO_OP_WARNING)
            return RayCollector(
                create_envs,
                policy=None,  # workers build it; push_weights sends the learner's weights
                policy_factory=factory,
                frames_per_batch=frames,
                total_frames=total_frames,
                exploration_type=exploration,
                collector_class=_RayWorkerCollector,
                collector_kwargs=[dict(worker_kwargs) for _ in create_envs],
                sync=True,
                ray_init_config=ray_init,
            )
    raise ValueError(f"unknown backend {config.backend!r}")


_RAY_NO_OP_WARNING = (
    r"The policy is not an nn\.Module\. TorchRL will assume .*update_policy_weights_"
)
"""TorchRL's warning when a collector gets ``policy=None``: its weight updates "will be a no-op"."""


class _RayWorkerCollector(Collector):
    """A ``Collector`` with a one-line repr, for Ray workers.

    Ray names an actor's log stream with the actor's repr, printed by the worker and used as the
    ``(name pid=...)`` line prefix; ``Collector``'s spans ~145 lines (env, transforms, policy)
    and reached the driver's console whole, several times per worker.
    """

    def __repr__(self) -> str:
        return "CollectorWorker"


def push_weights(collector: BaseCollector, actor: nn.Module, config: TrainConfig) -> None:
    """Sends the learner's current weights to the collector's workers (in-process: no-op).

    Uses TorchRL's weight-sync API (``collector.update_policy_weights_``); the next batch the
    collector yields is collected with these weights.
    """
    if config.backend == "inprocess":
        return  # the collector runs ``actor`` itself
    collector.update_policy_weights_(TensorDict.from_module(actor).data)


def segment_batches(
    actor: nn.Module, config: TrainConfig, start: int, expert: bool, salt: int = 0
) -> Iterator[tuple[int, TensorDictBase]]:
    """Yields ``(update, batch [num_envs, unroll_len])`` for the updates from ``start`` on.

    With a multi-worker backend, the learner's weights are pushed to the workers when each
    segment's collector starts and after each update (when the loop asks for the next batch,
    i.e. after its optimizer step).
    """
    frames = config.num_envs * config.unroll_len
    greedy = config.algo == "imitation" and config.student_action == "greedy"
    exploration = InteractionType.DETERMINISTIC if greedy else InteractionType.RANDOM
    update = start
    while update < config.num_updates:
        segment = update // config.checkpoint_interval
        end = min((segment + 1) * config.checkpoint_interval, config.num_updates)
        seed = config.seed + 7919 * (segment + 1) + salt
        create_envs = env_factories(config, expert, seed)
        # Closing a batched env raises torch's thread count (torchrl 0.14): the next segment's
        # collection would run with other threads than a resumed run's (other rounding).
        with keep_num_threads():
            with workers_ignore_signals():
                collector = make_collector(
                    config, actor, create_envs, frames * (end - update), exploration
                )
            try:
                batches = iter(collector)
                while update < end:
                    push_weights(collector, actor, config)
                    # Workers may start lazily (ParallelEnv: at the first reset).
                    first = update == start or update % config.checkpoint_interval == 0
                    with workers_ignore_signals() if first else contextlib.nullcontext():
                        data = next(batches)
                    yield update, _as_env_rows(data, config)
                    update += 1
            finally:
                collector.shutdown()


@contextlib.contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    """Puts this process's SIGINT and SIGTERM handlers back after the block: ``ray.init``
    replaces the SIGTERM one (by ``sys.exit(15)``, and Ray's native handler aborts), which
    would end the run without its checkpoint and leave Ray's processes behind."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)


@contextlib.contextmanager
def workers_ignore_signals() -> Iterator[None]:
    """Blocks SIGINT and SIGTERM in this thread meanwhile: processes started inside (collector
    and env workers, Ray's) inherit the blocked mask, through fork and exec.

    So a Ctrl-C or a scheduler's SIGTERM sent to the whole process group reaches the learner
    alone, which finishes its update, saves, and shuts the workers down (TorchRL's shutdown
    ends with SIGKILL where a worker does not stop). A signal arriving meanwhile is not lost:
    another thread of the learner takes it, or it stays pending until the mask is restored.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _as_env_rows(data: TensorDictBase, config: TrainConfig) -> TensorDictBase:
    """``[(workers,) (envs,) time]`` → ``[num_envs, unroll_len]``, row ``i`` = env ``i``."""
    if isinstance(data, LazyStackedTensorDict):
        data = data.contiguous()
    if data.names[-1] is not None:  # MultiSyncCollector names its time dim
        data = data.clone(False)
        data.names = None
    return data.reshape(config.num_envs, config.unroll_len)


def _free_port() -> int:
    """A TCP port free right now on this machine (for the mp launcher's process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]
