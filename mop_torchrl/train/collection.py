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

Overlapped collection (``config.overlap``, imitation with the ``inprocess`` or ``multiprocess``
backend): the collector above runs in one long-lived worker process (:class:`CollectorWorker`)
instead of the learner's, and batch ``k + 1`` is requested, with the learner's weights of that
moment, *before* the learner trains on batch ``k``. So batch ``k + 1`` is collected with the
weights after update ``k - 1`` (a one-batch lag) while the learner runs update ``k``; the first
batch of each segment is requested after the previous update, with the current weights (the lag
resets at checkpoint boundaries, which is what keeps a fresh-process ``--resume`` exact). The
worker loads the weights it is sent (and DAgger's β, a buffer of
:class:`~mop_torchrl.train.dagger.BotMixer`) before each batch and re-seeds torch from ``(seed,
update, "collect")``, so its randomness does not depend on the learner's history. No weights
are ever applied while a batch is being collected.
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import signal
import socket
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence

import torch
from tensordict import LazyStackedTensorDict, TensorDict, TensorDictBase
from tensordict.nn import InteractionType
from torch import nn
from torchrl.collectors import BaseCollector, Collector, MultiSyncCollector
from torchrl.envs import EnvBase

from mop_torchrl.babyai.envs import keep_num_threads, make_babyai_env, worker_seeds
from mop_torchrl.train.checkpoint import seed_everything
from mop_torchrl.train.config import TrainConfig

__all__ = [
    "SLURM_ENV_VAR",
    "CollectorWorker",
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

    With ``expert=True`` the bot labels every step, and with ``config.train_path_ratio`` also
    measures its own solution length from each start (for the path ratio). ``num_envs``
    defaults to ``config.num_envs``.
    """
    return functools.partial(
        make_babyai_env,
        config.task_id,
        num_envs=config.num_envs if num_envs is None else num_envs,
        seed=seed,
        expert=expert,
        parallel=config.env_batching == "parallel",
        path_ratio=expert and config.train_path_ratio,
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
    torch.set_num_threads(config.collector_threads)
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
            num_threads=config.collector_threads,
            num_sub_threads=config.collector_threads,
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
    i.e. after its optimizer step). With :func:`overlaps` true the batches come from a
    :class:`CollectorWorker`, one batch ahead (see the module's docstring).
    """
    if overlaps(config):
        return _overlapped_batches(actor, config, start, expert, salt)
    return _segment_batches(actor, config, start, expert, salt)


def overlaps(config: TrainConfig) -> bool:
    """Whether ``config``'s collection runs one batch ahead in a :class:`CollectorWorker`."""
    return (
        config.collection == "overlap"
        and config.algo == "imitation"
        and config.backend in _OVERLAP_BACKENDS
    )


_OVERLAP_BACKENDS = ("inprocess", "multiprocess")


def _segment_batches(
    actor: nn.Module,
    config: TrainConfig,
    start: int,
    expert: bool,
    salt: int = 0,
    before_batch: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, TensorDictBase]]:
    """:func:`segment_batches` without overlap; ``before_batch(update)`` runs before each
    batch is requested (the overlap worker loads that batch's weights there)."""
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
                    if before_batch is not None:
                        before_batch(update)
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


def _overlapped_batches(
    student: nn.Module, config: TrainConfig, start: int, expert: bool, salt: int
) -> Iterator[tuple[int, TensorDictBase]]:
    """Batches from a :class:`CollectorWorker`, each requested one update ahead.

    Batch ``k + 1`` is requested (with the weights of that moment: after update ``k - 1``)
    before batch ``k`` is handed to the loop; a segment's first batch is requested only when
    the loop asks for it (after the previous update: the current weights).
    """
    with workers_ignore_signals():
        worker = CollectorWorker(config, expert, salt)
    try:
        update = start
        worker.request(update, student)
        while update < config.num_updates:
            data = worker.receive(update)
            ahead = update + 1 < config.num_updates and (update + 1) % config.checkpoint_interval
            if ahead:
                worker.request(update + 1, student)
            yield update, data
            update += 1
            if not ahead and update < config.num_updates:
                worker.request(update, student)  # a segment starts: the current weights
    finally:
        worker.close()


class CollectorWorker:
    """A process that collects batches with this module's collectors, one request at a time.

    :meth:`request` sends the batch's update index and a copy of ``student``'s weights (params
    and buffers) and returns at once; :meth:`receive` waits for that batch. In the worker, each
    request loads the weights into its own copy of the collection policy (the config's actor,
    followed by a :class:`~mop_torchrl.train.dagger.BotMixer` when ``dagger_beta > 0``),
    re-seeds torch from ``(seed, update, "collect")`` and collects with the collector of the
    update's segment (built fresh, from the segment's env seeds, when a segment starts; the
    ``inprocess`` backend's :class:`~torchrl.collectors.Collector` in the worker, or the
    ``multiprocess`` backend's workers under it). The worker ignores SIGINT (the learner
    decides when to stop) and exits when the learner's end of the pipe closes.
    """

    def __init__(self, config: TrainConfig, expert: bool, salt: int = 0) -> None:
        # spawn, not fork: a forked child of a learner whose OpenMP pool has run deadlocks in
        # its first parallel region (libgomp is not fork-safe; seen here). Importing torch and
        # torchrl again costs a few seconds, once per run, while the learner sets up.
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_worker_main,
            args=(child, config.to_dict(), expert, salt),
            name="mop-collector",
            daemon=False,  # the multiprocess backend starts its own workers from it
        )
        self._process.start()
        child.close()
        self._pending: int | None = None

    def request(self, update: int, student: nn.Module) -> None:
        """Asks for batch ``update``, collected with ``student``'s weights as they are now."""
        if self._pending is not None:
            raise RuntimeError(f"batch {self._pending} was requested and not received yet")
        # A copy: torch shares a sent tensor's storage with the receiver, and the learner's own
        # parameters must not change under the worker's feet.
        weights = TensorDict.from_module(student).data.clone()
        self._conn.send(("batch", update, weights))
        self._pending = update

    def receive(self, update: int) -> TensorDictBase:
        """Waits for batch ``update`` (requested before) and returns it, ``[num_envs, T]``."""
        if self._pending != update:
            raise RuntimeError(f"batch {update} was not requested (pending: {self._pending})")
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            code = self._process.exitcode
            raise RuntimeError(f"the collector worker died (exit code {code})") from None
        self._pending = None
        if kind == "error":
            raise RuntimeError(f"the collector worker failed:\n{payload}")
        return payload

    def close(self) -> None:
        """Stops the worker (after the batch in flight, if any) and waits for it."""
        if self._process.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):  # it died: join() reaps it
                self._conn.send(("close", None, None))
        self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()


def _collection_policy(config: TrainConfig) -> nn.Module:
    """The worker's copy of the learner's collection policy (actor, then β mixing if any)."""
    from tensordict.nn import TensorDictSequential

    from mop_torchrl.train.dagger import BotMixer
    from mop_torchrl.train.policy import build_policy

    actor = build_policy(config)[0].eval()
    return TensorDictSequential(actor, BotMixer()) if config.dagger_beta > 0 else actor


def _worker_main(conn, config_dict: dict, expert: bool, salt: int) -> None:
    """:class:`CollectorWorker`'s process: answers ``("batch", update, weights)`` requests."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = TrainConfig.from_dict(config_dict)
    torch.set_num_threads(config.collector_threads)
    weights: dict[str, TensorDictBase] = {}
    batches: Iterator[tuple[int, TensorDictBase]] | None = None
    policy: nn.Module | None = None
    expected = -1

    def load(update: int) -> None:
        torch.set_num_threads(config.collector_threads)  # torchrl raises it on env close
        TensorDict.from_module(policy).data.update_(weights.pop("next"))
        seed_everything(config.seed, update, "collect")

    try:
        while True:
            try:
                kind, update, sent = conn.recv()
            except EOFError:
                return
            if kind == "close":
                return
            try:
                weights["next"] = sent
                if batches is None or update != expected:
                    if batches is not None:
                        batches.close()
                    policy = _collection_policy(config)
                    batches = _segment_batches(policy, config, update, expert, salt, load)
                got, data = next(batches)
                assert got == update, (got, update)
                expected = update + 1
                conn.send(("batch", data.clone()))
            except Exception:
                conn.send(("error", traceback.format_exc()))
                return
    finally:
        if batches is not None:
            batches.close()
        conn.close()


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
