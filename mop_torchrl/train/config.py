"""``TrainConfig``: every training setting as one typed tree, validated once.

``TrainConfig`` holds the run's own settings and two nested configs, ``mop`` (the core's
architecture, :class:`~mop_torchrl.core.config.MoPConfig`) and ``encoder``
(:class:`~mop_torchrl.babyai.policy.EncoderConfig`). The YAML files under ``configs/``, the
command line (generated from the fields by :func:`add_config_arguments`) and the config saved
in each checkpoint are this one structure, so flags, defaults and help never drift apart.

- Nested keys are written ``mop.layers`` on the command line and ``mop: {layers: ...}`` in
  YAML; the BabyAI integration's flat names (``--mop_layers``, ``--instr_dim`` ...,
  :data:`FLAT_KEYS`) are aliases, and so configs saved before the tree was nested still load.
- ``mop.preset`` (flat: ``mop_preset``) names the preset the other ``mop`` values start from;
  the saved config holds every resolved value instead.
- Each dataclass checks its own fields in ``__post_init__``; ``TrainConfig`` adds the rules
  that tie fields together. Errors name the key (``config key 'mop.layers': ...``).
- A field's help text and whether a resumed run may change it live in its metadata
  (``metadata["help"]``, ``metadata["resumable"]``); :data:`RESUMABLE_CHANGES` is read from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from mop_torchrl.babyai.policy import EncoderConfig
from mop_torchrl.core.config import (
    DEFAULT_ALPHA,
    DEFAULT_RL_ALPHA,
    PRESETS,
    ConfigError,
    MoPConfig,
    check_fields,
    setting,
)

__all__ = [
    "FLAT_KEYS",
    "MAX_NUM_ENVS",
    "MAX_SEED",
    "RESUMABLE_CHANGES",
    "SAVED_DEFAULTS",
    "TrainConfig",
    "add_config_arguments",
    "auto_threads",
    "load_config",
    "native_bfloat16",
]


@dataclasses.dataclass
class TrainConfig:
    """Training run settings (CleanRL style: one field, one flag, one line of help).

    Examples:
        >>> config = TrainConfig.from_dict({"mop_layers": "0,8;8,16", "encoder": {"instr_dim": 16}})
        >>> config.mop.layers, config.encoder.instr_dim, config.alpha
        ([[0, 8], [8, 16]], 16, 0.01)
        >>> config.to_dict()["mop"]["layers"]
        '0,8;8,16'
        >>> TrainConfig.from_dict(config.to_dict()) == config
        True
        >>> TrainConfig.from_dict({"mop": {"router_dim": 0}})
        Traceback (most recent call last):
        ...
        mop_torchrl.core.config.ConfigError: config key 'mop.router_dim' must be > 0, got 0
    """

    algo: Literal["imitation", "bc", "ppo"] = setting(
        "imitation",
        "imitation: online DAgger with bot labels; bc: behaviour cloning from demos; ppo: RL.",
    )
    task_id: str = setting(
        "BabyAI-GoToRedBall-v0",
        "BabyAI level (gymnasium id, or its short name such as GoToLocal); several levels as "
        '"GoToRedBall,GoToLocal" (or a YAML list): each env draws its level per episode.',
    )
    level_weights: str | None = setting(
        None,
        'Sampling weights of the task_id levels, e.g. "1,1,2" (or a YAML list); default uniform.',
    )
    policy: Literal["mop", "gru"] = setting(
        "mop", "Recurrent core: Mixture-of-Pathways or the GRU baseline."
    )
    seed: int = setting(0, "Seed for torch, the envs and the samplers.")
    device: str = setting("cpu", "Device of the policy and the losses.")
    torch_threads: int = setting(
        0,
        "torch intra-op threads of the learner; 0: from the machine's cores (auto_threads: 1 "
        "when envs step in the learner's process, else the cores the collector processes leave, "
        "at most 4). The resolved number is saved with the run.",
    )
    autocast: Literal["off", "bfloat16", "auto"] = setting(
        "off",
        "imitation, bc: the learner's forward pass under torch.autocast in bfloat16 (recurrences, "
        "losses and weights stay float32; collection and evaluation run in float32); auto: "
        "bfloat16 where the hardware computes it natively (CPU with AVX512-BF16 or AMX, CUDA "
        "with bf16 support), else off. About 0.7x the float32 update time of the GoToLocal config "
        "on a CPU with AVX512-BF16. The resolved value is saved with the run.",
    )
    num_envs: int = setting(16, "Environments stepped together.")
    env_batching: Literal["serial", "parallel"] = setting(
        "serial",
        "How envs are batched: one process (BabyAIBatchedEnv) or one worker each (ParallelEnv).",
    )
    backend: Literal["inprocess", "multiprocess", "distributed", "ray"] = setting(
        "inprocess",
        "Collection backend: in this process, num_workers local processes, torch.distributed "
        "workers (see distributed_launcher) or a Ray cluster (the [distributed] extra).",
    )
    worker_log_level: Literal["warning", "info", "debug"] = setting(
        "warning",
        "backend ray: what the workers' logs send to this console: warnings and errors only, or "
        "also info/debug messages.",
        resumable=True,
    )
    num_workers: int = setting(
        1, "Collector workers of the multi-worker backends, num_envs // num_workers envs each."
    )
    collection: Literal["sync", "overlap"] = setting(
        "sync",
        "imitation with backend inprocess/multiprocess: sync: collect, then train; overlap: a "
        "worker process collects the next batch while the learner trains on this one (the "
        "student that acts is one update behind: batch k+1 uses the weights after update k-1; "
        "about 2x the frames/s with a free core; on GoToLocal as good as sync with the bot "
        "acting early (dagger_beta > 0), 2-6 points lower held-out success without it).",
    )
    collector_threads: int = setting(
        1, "torch intra-op threads of each collector process (overlap and multiprocess workers)."
    )
    train_path_ratio: bool = setting(
        False,
        "imitation: also log train/path_ratio, the episode's length over the bot's; the bot then "
        "solves every training episode from its start on a copy of the env (about a third of "
        "the collection time on GoToLocal with the bot acting). Evaluations always measure it.",
    )
    distributed_launcher: Literal["mp", "submitit"] = setting(
        "mp",
        "backend distributed: start the workers on this machine (mp) or as SLURM jobs (submitit, "
        "options from the MOP_TORCHRL_SLURM JSON environment variable).",
    )
    unroll_len: int = setting(32, "Steps per env per update (truncated BPTT length).")
    num_updates: int = setting(300, "Optimizer updates in the run.", resumable=True)
    lr: float = setting(1e-3, "Adam learning rate.")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.")
    student_action: Literal["greedy", "sample"] = setting(
        "greedy", "imitation: the student acts greedily or samples from its policy."
    )
    buffer_frames: int = setting(
        32768,
        "imitation: frames of labelled student rollouts kept for replay (the DAgger dataset).",
    )
    updates_per_batch: int = setting(
        4, "imitation: optimizer updates on replayed slices per collected batch."
    )
    burn_in: int = setting(
        0,
        "imitation: steps at the start of each replayed slice that refresh the stored hidden "
        "state without a loss (R2D2); burn_in + slice_len <= unroll_len.",
    )
    dagger_beta: float = setting(
        0.0, "imitation: probability that the bot, not the student, acts (DAgger's β) at update 0."
    )
    dagger_beta_updates: int = setting(
        0, "imitation: updates over which β decays linearly to 0 (0: β stays constant)."
    )
    lr_decay_updates: int = setting(
        0, "imitation: updates over which the learning rate decays linearly to 0 (0: constant)."
    )

    mop: MoPConfig = dataclasses.field(
        default_factory=lambda: MoPConfig.from_preset("seed"),
        metadata={
            "help": "The Mixture-of-Pathways core (input_dim is not a training setting: the "
            "policy builder sets it to the encoder's output width)."
        },
    )
    alpha: float | None = setting(
        None,
        "Routing-cost weight α (0 disables it), in the units mop.cost_norm gives the cost; "
        f"default {DEFAULT_ALPHA:g} for imitation and bc (DEFAULT_ALPHA), {DEFAULT_RL_ALPHA:g} "
        "for ppo (DEFAULT_RL_ALPHA, in the plain form).",
    )
    epsilon: float = setting(1e-2, "ε of the performance-scaled routing cost.")
    cost_mode: Literal["scaled", "plain"] = setting(
        "scaled",
        "imitation, bc: routing cost term L + α·cost/(ε+L) (scaled, the paper's) or L + α·cost "
        "(plain). ppo always adds α·cost (plain): its loss is not a positive performance measure.",
    )
    cost_scaling: Literal["auto", "per_level", "batch"] = setting(
        "auto",
        "imitation, bc: per_level: the routing term per level of a multi-level batch, Σ_k "
        "w_k·[L_k + α·cost_k/(ε+L_k)] (the paper's per-task form; w_k = level k's share of the "
        "labelled steps); batch: one L and one mean cost for the batch; auto: per_level with "
        "several levels, else batch. The resolved value is saved with the run.",
    )
    gru_hidden_size: int = setting(512, "Hidden size of the GRU baseline core.")
    encoder: EncoderConfig = dataclasses.field(
        default_factory=EncoderConfig, metadata={"help": "The observation encoder."}
    )

    demos: str | None = setting(
        None, "bc: directory of a demo buffer written by `mop-torchrl demos`."
    )
    batch_slices: int = setting(16, "imitation, bc: sequences per optimizer update.")
    slice_len: int | None = setting(
        None,
        "imitation, bc: length of each sequence (its loss-bearing steps in imitation); default "
        "unroll_len - burn_in (imitation: whole collected rows), 32 (bc).",
    )

    init_checkpoint: str | None = setting(
        None,
        "Start a new run from this checkpoint's actor weights (a run directory or its "
        "checkpoint.pt; same policy architecture): a curriculum, or PPO from imitation.",
    )
    ppo_epochs: int = setting(4, "ppo: passes over each batch.")
    minibatches: int = setting(
        4, "ppo: minibatches per pass (split along envs, sequences kept whole)."
    )
    clip_epsilon: float = setting(0.2, "ppo: clipping range.")
    gamma: float = setting(0.99, "ppo: discount.")
    gae_lambda: float = setting(0.95, "ppo: GAE λ.")
    entropy_coef: float = setting(0.01, "ppo: entropy bonus.")
    critic_coef: float = setting(0.5, "ppo: value loss weight.")

    run_dir: str = setting("runs", "Parent directory of run directories.")
    run_name: str | None = setting(
        None, "Run directory name (default: <algo>-<policy>-<level>-s<seed>)."
    )
    log_interval: int = setting(10, "Updates between log lines.", resumable=True)
    checkpoint_interval: int = setting(
        50, "Updates between checkpoints (one is also written at the end)."
    )
    eval_episodes: int = setting(
        100, "Episodes of greedy evaluation at the end of the run (0 skips it).", resumable=True
    )
    eval_interval: int = setting(
        0,
        "Updates between held-out evaluations during training, logged as eval/* (success and "
        "the grounding probe); 0: only the final evaluation.",
        resumable=True,
    )
    eval_interval_episodes: int = setting(
        50,
        "Episodes of each evaluation during training (and bot episodes of its grounding probe).",
        resumable=True,
    )
    logger: Literal["csv", "tensorboard", "wandb", "mlflow"] = setting(
        "csv",
        "TorchRL logger for the scalars (wandb runs offline; wandb/mlflow must be installed).",
        resumable=True,
    )

    def __post_init__(self) -> None:
        for name in _LIST_KEYS:  # the YAML list form, stored comma-separated
            if isinstance(getattr(self, name), list):
                setattr(self, name, ",".join(str(item) for item in getattr(self, name)))
        check_fields(self)
        self._check_run_limits()
        positive = ["num_envs", "unroll_len", "num_updates", "log_interval", "checkpoint_interval"]
        positive += ["gru_hidden_size", "batch_slices", "ppo_epochs", "minibatches"]
        positive += ["num_workers", "collector_threads", "updates_per_batch"]
        if self.torch_threads < 0:
            raise ConfigError("torch_threads", f"must be >= 0, got {self.torch_threads}")
        if self.torch_threads == 0:
            self.torch_threads = auto_threads(self)
        if self.autocast == "auto":
            native = native_bfloat16(self.device) and self.algo != "ppo"
            self.autocast = "bfloat16" if native else "off"
        if self.autocast == "bfloat16" and self.algo == "ppo":
            raise ConfigError(
                "autocast", "ppo updates run in float32 (its probability ratios need it); use off"
            )
        positive += ["lr", "max_grad_norm", "clip_epsilon", "epsilon"]
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)!r}")
        if self.alpha is None:
            self.alpha = DEFAULT_RL_ALPHA if self.algo == "ppo" else DEFAULT_ALPHA
        if self.alpha < 0:
            raise ConfigError("alpha", f"must be >= 0, got {self.alpha!r}")
        if self.cost_scaling == "auto":
            self.cost_scaling = "per_level" if len(self.levels) > 1 else "batch"
        elif self.cost_scaling == "per_level" and len(self.levels) == 1:
            raise ConfigError(
                "cost_scaling",
                f"'per_level' needs several levels in task_id, got {self.task_id!r} (one level: "
                "batch)",
            )
        for name in ("gamma", "gae_lambda"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(name, f"must be in [0, 1], got {getattr(self, name)}")
        if self.slice_len is None:
            self.slice_len = self.unroll_len - self.burn_in if self.algo == "imitation" else 32
        if self.slice_len <= 0:
            raise ConfigError("slice_len", f"must be > 0, got {self.slice_len}")
        if self.algo == "imitation":
            if self.burn_in < 0 or self.burn_in + self.slice_len > self.unroll_len:
                raise ValueError(
                    f"config keys 'burn_in' ({self.burn_in}) + 'slice_len' ({self.slice_len}) "
                    f"must be at most 'unroll_len' ({self.unroll_len}): replayed slices lie "
                    "within one collected row"
                )
            if self.buffer_frames % self.unroll_len or self.buffer_frames < self.unroll_len:
                raise ValueError(
                    f"config key 'buffer_frames' ({self.buffer_frames}) must be a positive "
                    f"multiple of 'unroll_len' ({self.unroll_len})"
                )
            if self.buffer_frames < self.num_envs * self.unroll_len:
                raise ConfigError(
                    "buffer_frames",
                    f"must hold at least one collected batch, num_envs x unroll_len = "
                    f"{self.num_envs * self.unroll_len} frames, got {self.buffer_frames} (a "
                    "smaller buffer keeps only the batch's last rows)",
                )
            if not 0 <= self.dagger_beta <= 1 or self.dagger_beta_updates < 0:
                raise ValueError(
                    f"config keys 'dagger_beta' ({self.dagger_beta}) must be in [0, 1] and "
                    f"'dagger_beta_updates' ({self.dagger_beta_updates}) >= 0"
                )
            if self.dagger_beta > 0 and self.backend != "inprocess":
                raise ValueError("config key 'dagger_beta' > 0 needs backend 'inprocess'")
            if self.lr_decay_updates < 0:
                raise ConfigError("lr_decay_updates", f"must be >= 0, got {self.lr_decay_updates}")
        if self.eval_interval < 0 or self.eval_interval_episodes <= 0:
            raise ValueError(
                f"config keys 'eval_interval' ({self.eval_interval}) must be >= 0 and "
                f"'eval_interval_episodes' ({self.eval_interval_episodes}) > 0"
            )
        if self.eval_episodes < 0:
            raise ConfigError("eval_episodes", f"must be >= 0, got {self.eval_episodes}")
        if self.algo == "bc" and not self.demos:
            raise ValueError("config key 'demos' is required with algo 'bc'")
        if self.algo == "ppo" and self.num_envs % self.minibatches:
            raise ValueError(
                f"config key 'minibatches' ({self.minibatches}) must divide num_envs "
                f"({self.num_envs})"
            )
        if self.backend == "inprocess" and self.num_workers != 1:
            raise ValueError(
                f"config key 'num_workers' ({self.num_workers}) needs a multi-worker backend "
                "(multiprocess, distributed or ray), got backend 'inprocess'"
            )
        if self.num_envs % self.num_workers:
            raise ValueError(
                f"config key 'num_workers' ({self.num_workers}) must divide num_envs "
                f"({self.num_envs})"
            )

    def _check_run_limits(self) -> None:
        """The seed's range, the levels, the run's name and the number of envs."""
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(
                "seed",
                f"must be in [0, {MAX_SEED}] (numpy's seed sequences take unsigned 32-bit "
                f"seeds), got {self.seed}",
            )
        if not self.levels:
            raise ConfigError("task_id", f"names no level, got {self.task_id!r}")
        from mop_torchrl.babyai.levels import parse_level_weights

        try:
            parse_level_weights(self.level_weights, len(self.levels))
        except ValueError as err:
            raise ConfigError("level_weights", str(err)) from None
        name = self.run_name
        if name is not None and (name in ("", ".", "..") or "/" in name or "\\" in name):
            raise ConfigError(
                "run_name", f"must be one directory name (no '/', not '.' or '..'), got {name!r}"
            )
        if self.num_envs > MAX_NUM_ENVS:
            raise ConfigError(
                "num_envs",
                f"must be at most {MAX_NUM_ENVS}, got {self.num_envs}: every env is a BabyAI "
                "game and its bot in memory (a few MB each), all built before the first update",
            )

    @property
    def levels(self) -> list[str]:
        """The ``task_id`` levels as given (one, or several for multi-level training)."""
        return [name.strip() for name in self.task_id.split(",") if name.strip()]

    @property
    def name(self) -> str:
        """The run directory's name: ``run_name``, or ``<algo>-<policy>-<level>-s<seed>``."""
        levels = self.levels
        level = levels[0].removeprefix("BabyAI-").removesuffix("-v0")
        if len(levels) > 1:
            level = f"{len(levels)}levels"
        return self.run_name or f"{self.algo}-{self.policy}-{level}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """The nested, YAML-friendly form (``mop`` as its ``to_dict``, layers a spec string)."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, MoPConfig):
                value = {k: v for k, v in value.to_dict().items() if k not in _BUILDER_KEYS}
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            out[field.name] = value
        return out

    @classmethod
    def from_saved(cls, data: Mapping[str, Any]) -> TrainConfig:
        """The config a run saved (its checkpoint's or its ``config.yaml``): :meth:`from_dict`,
        with the keys added since it was written set to what it trained with
        (:data:`SAVED_DEFAULTS`), not to today's defaults."""
        return cls.from_dict(_with_saved_defaults(data))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Builds a config from its nested form, the flat form (:data:`FLAT_KEYS`, as saved
        by earlier versions) or a mix; dotted keys (``"mop.layers"``) work too. Unknown keys
        are an error naming them."""
        values = _nested(data)
        sections = {}
        for name, section in _SECTIONS.items():
            given = dict(values.pop(name, {}))
            try:
                if section is MoPConfig:
                    preset = given.pop(PRESET_KEY, "seed")
                    if preset not in PRESETS:
                        raise ConfigError(
                            PRESET_KEY, f"must be one of {sorted(PRESETS)}, got {preset!r}"
                        )
                    sections[name] = MoPConfig.from_preset(preset, **given)
                else:
                    sections[name] = section(**given)
            except ConfigError as err:
                raise err.within(name) from None
        return cls(**values, **sections)


MAX_SEED = 2**32 - 1
"""The largest ``seed``: numpy's seed sequences, which seed the envs, take unsigned 32-bit ints."""

MAX_NUM_ENVS = 1024
"""The most envs a run builds: each is a BabyAI game and bot in memory, all built up front."""

FLAT_KEYS: dict[str, str] = {
    "mop_preset": "mop.preset",
    "mop_layers": "mop.layers",
    "mop_intermediate_dim": "mop.intermediate_dim",
    "mop_router_dim": "mop.router_dim",
    "cost_norm": "mop.cost_norm",
    "dropout_beta": "mop.dropout_beta",
    "dropout_gamma": "mop.dropout_gamma",
    "image_channels": "encoder.image_channels",
    "instr_dim": "encoder.instr_dim",
}
"""Flat names of nested keys: the BabyAI integration's flags (``--mop_layers``...) and the keys
of configs saved before the tree was nested. Accepted wherever a config is read."""

RESUMABLE_CHANGES: frozenset[str] = frozenset(
    field.name for field in dataclasses.fields(TrainConfig) if field.metadata.get("resumable")
)
"""Top-level keys a resumed run may change (they do not alter the training so far): the fields
marked ``resumable`` in their metadata."""

SAVED_DEFAULTS: dict[str, Any] = {
    "cost_scaling": "batch",
    "collection": "sync",
    "train_path_ratio": True,
    "autocast": "off",
}
"""Keys added to the config since runs were first saved, with the value that reproduces how a
run saved without them trained (:meth:`TrainConfig.from_saved`): ``cost_scaling`` came with
per-level routing costs (before it, every run used the batch form), ``collection`` with the
overlapped collector (before it, every run collected in sync), ``train_path_ratio`` when
training stopped measuring it by default (before, every imitation run logged it),
``autocast`` with bfloat16 learner updates (before, every update ran in float32)."""

PRESET_KEY = "preset"
"""The key in the ``mop`` section naming the preset its other values start from."""

_SECTIONS: dict[str, type] = {"mop": MoPConfig, "encoder": EncoderConfig}
"""The nested configs of :class:`TrainConfig`, by field name."""

_BUILDER_KEYS = ("input_dim",)
"""MoPConfig keys the policy builder sets; not part of a training config."""

_PRESET_NONE = ("mop_layers", "mop_intermediate_dim", "mop_router_dim")
"""Flat keys whose ``None`` (in configs saved before the tree was nested) meant "the preset's"."""

_LIST_KEYS = ("task_id", "level_weights")
"""String keys that also accept a YAML list, stored comma-separated."""


def _section_keys(name: str) -> list[str]:
    keys = [f.name for f in dataclasses.fields(_SECTIONS[name]) if f.name not in _BUILDER_KEYS]
    return [PRESET_KEY, *keys] if _SECTIONS[name] is MoPConfig else keys


def _nested(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with flat and dotted keys moved into their sections; unknown keys are an error."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a config must be a mapping of keys to values, got {data!r}")
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        if key in _PRESET_NONE and value is None:
            continue
        key = FLAT_KEYS.get(key, key)
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ValueError(f"config key {key!r} must be a mapping of keys to values")
            items += [(f"{key}.{sub}", sub_value) for sub, sub_value in value.items()]
        else:
            items.append((key, value))
    top = {f.name for f in dataclasses.fields(TrainConfig)} - set(_SECTIONS)
    known = top | {f"{s}.{k}" for s in _SECTIONS for k in _section_keys(s)}
    unknown = sorted(str(key) for key, _ in items if key not in known)
    builder = [key for key in unknown if key.partition(".")[2] in _BUILDER_KEYS]
    if builder:
        raise ValueError(
            f"config key {builder[0]!r} is set by the policy builder (the encoder's output "
            "width), not by the config"
        )
    if unknown:
        raise ValueError(f"unknown config keys {unknown}")
    out: dict[str, Any] = {}
    for key, value in items:
        section, _, sub = key.partition(".")
        target, name = (out.setdefault(section, {}), sub) if sub else (out, key)
        if name in target:
            flat = [k for k, v in FLAT_KEYS.items() if v == key]
            raise ValueError(f"config key {key!r} is given twice (also as {flat[0]!r})")
        target[name] = value
    return out


def _with_saved_defaults(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (a saved config) with :data:`SAVED_DEFAULTS` for the keys it lacks."""
    if not isinstance(data, Mapping):
        return data  # from_dict names the problem
    return {**SAVED_DEFAULTS, **data}


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Nested ``base`` updated by nested ``overrides``, section by section."""
    out = {**base, **overrides}
    for name in _SECTIONS:
        if name in base and name in overrides:
            out[name] = {**base[name], **overrides[name]}
    return out


def auto_threads(config: TrainConfig, cores: int | None = None) -> int:
    """The learner's torch threads on a machine with ``cores`` cores (default: this one's).

    1 when the envs step in the learner's process (in-process collection without overlap:
    env, bot and learner take turns, and spin-waiting OpenMP threads slowed the env down);
    otherwise the cores left by the collector processes (``num_workers`` or the overlap
    worker, ``collector_threads`` each), between 1 and 4 (the update's products are small:
    16 x 32 slices).

    Examples:
        >>> config = TrainConfig(torch_threads=1, collection="overlap")
        >>> auto_threads(config, 2), auto_threads(config, 16)
        (1, 4)
    """
    cores = cores or os.cpu_count() or 1
    overlap = config.collection == "overlap" and config.algo == "imitation"
    if config.backend == "inprocess" and not overlap:
        return 1
    processes = config.num_workers if config.backend == "multiprocess" else 1
    return max(1, min(4, cores - processes * config.collector_threads))


def native_bfloat16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 products natively (``autocast: auto``).

    On a CPU without AVX512-BF16 or AMX, oneDNN emulates bfloat16 and the products are no
    faster than float32 (or slower), so only the rounding would change.

    Examples:
        >>> native_bfloat16("meta")
        False
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # x86; private, hence getattr
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    saved: bool = False,
) -> TrainConfig:
    """Reads a YAML config (optional) and applies overrides (nested, dotted or flat keys);
    errors name the offending key. ``saved=True``: ``path`` is a run's saved ``config.yaml``
    (keys it lacks take :data:`SAVED_DEFAULTS`, see :meth:`TrainConfig.from_saved`)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except UnicodeDecodeError:
            raise ValueError(f"config file {str(path)!r} is not text") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(
                f"config file {str(path)!r} is not valid YAML{where}: {problem}"
            ) from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of keys to values")
        data = _nested(_with_saved_defaults(loaded) if saved else loaded)
    return TrainConfig.from_dict(_merged(data, _nested(overrides or {})))


# ------------------------------------------------------------------------ the command line
def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per config key, generated from the fields: ``--num_envs``, and per nested
    key ``--mop.layers`` (``dest`` ``"mop.layers"``), with its :data:`FLAT_KEYS` spelling
    (``--mop_layers``) as an alias. No flag has a default: an unset flag leaves the YAML's
    value (or the field's default) in place.

    Plain ``argparse`` rather than a CLI library: the tree is two levels deep with a handful of
    aliases, and the console script's one-line errors (``_Parser.error``) and the ``bench``
    hand-off already live on argparse; a dependency would buy little here.
    """
    aliases: dict[str, list[str]] = {}
    for flat, dotted in FLAT_KEYS.items():
        aliases.setdefault(dotted, []).append(flat)
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name not in _SECTIONS:
            _add_flag(parser, field.name, hints[field.name], _help(field), [])
    for name, section in _SECTIONS.items():
        field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
        group = parser.add_argument_group(name, field.metadata["help"])
        section_hints = typing.get_type_hints(section)
        for key in _section_keys(name):
            dotted = f"{name}.{key}"
            if key == PRESET_KEY:
                hint: Any = Literal[tuple(PRESETS)]
                text = f"MoP preset the other {name}.* values start from (default: seed)."
            else:
                sub = next(f for f in dataclasses.fields(section) if f.name == key)
                hint = section_hints[key]
                text = _help(sub, preset=section is MoPConfig)
            _add_flag(group, dotted, hint, text, aliases.get(dotted, []))


def _help(field: dataclasses.Field, preset: bool = False) -> str:
    if preset and any(field.name in values for values in PRESETS.values()):
        default = "the preset's"
    elif field.default not in (dataclasses.MISSING, None):
        default = field.default
    else:
        return field.metadata.get("help", "")
    return f"{field.metadata.get('help', '')} (default: {default})"


def _add_flag(
    parser: argparse._ActionsContainer, key: str, hint: Any, text: str, aliases: list[str]
) -> None:
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
    base = next((o for o in typing.get_args(hint) if o is not type(None)), hint)
    if typing.get_origin(hint) is Literal:
        kwargs["choices"] = list(typing.get_args(hint))
    elif base in (int, float):
        kwargs.update(type=base, metavar=base.__name__.upper())
    elif base is bool:
        kwargs.update(type=_parse_bool, metavar="{true,false}")
    else:
        kwargs["metavar"] = "SPEC" if key.endswith(".layers") else "STR"
    flags = [f"--{key}", *(f"--{alias}" for alias in aliases)]
    parser.add_argument(*flags, dest=key, **kwargs)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return lowered == "true"
