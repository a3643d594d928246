"""``TrainConfig``: every training hyper-parameter as one typed dataclass.

The YAML files under ``configs/``, the command-line flags (``--task_id``, ``--num_envs``,
``--mop_layers "16,32;32,64"`` ... the BabyAI integration's names) and the config saved in each
checkpoint are this one structure, so flags, defaults and help never drift apart. Unknown keys,
wrong types and impossible values are rejected before any work starts, naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from mop_torchrl.babyai.policy import EncoderConfig
from mop_torchrl.core.config import MoPConfig, format_layers, parse_layers

__all__ = ["TrainConfig", "add_config_arguments", "load_config"]


@dataclasses.dataclass
class TrainConfig:
    """Training run settings (CleanRL style: one field, one flag, one line of help)."""

    algo: Literal["imitation", "bc", "ppo"] = "imitation"
    """imitation: online DAgger with bot labels; bc: behaviour cloning from demos; ppo: RL."""
    task_id: str = "BabyAI-GoToRedBall-v0"
    """BabyAI level (gymnasium id, or its short name such as GoToLocal); several levels as
    "GoToRedBall,GoToLocal" (or a YAML list): each env draws its level per episode."""
    level_weights: str | None = None
    """Sampling weights of the task_id levels, e.g. "1,1,2" (or a YAML list); default uniform."""
    policy: Literal["mop", "gru"] = "mop"
    """Recurrent core: Mixture-of-Pathways or the GRU baseline."""
    seed: int = 0
    """Seed for torch, the envs and the samplers."""
    device: str = "cpu"
    """Device of the policy and the losses."""
    torch_threads: int = 1
    """torch intra-op threads. 1 by default: on a small machine the env and bot share the
    cores, and OpenMP spin-waiting made 2 threads 7x slower than 1 under that load."""
    num_envs: int = 16
    """Environments stepped together."""
    env_batching: Literal["serial", "parallel"] = "serial"
    """How envs are batched: one process (SerialEnv) or one worker each (ParallelEnv)."""
    backend: Literal["inprocess", "multiprocess", "distributed", "ray"] = "inprocess"
    """Collection backend: in this process, num_workers local processes, torch.distributed
    workers (see distributed_launcher) or a Ray cluster (the [distributed] extra)."""
    worker_log_level: Literal["warning", "info", "debug"] = "warning"
    """backend ray: what the workers' logs send to this console: warnings and errors only, or
    also info/debug messages."""
    num_workers: int = 1
    """Collector workers of the multi-worker backends, num_envs // num_workers envs each."""
    distributed_launcher: Literal["mp", "submitit"] = "mp"
    """backend distributed: start the workers on this machine (mp) or as SLURM jobs (submitit,
    options from the MOP_TORCHRL_SLURM JSON environment variable)."""
    unroll_len: int = 32
    """Steps per env per update (truncated BPTT length)."""
    num_updates: int = 300
    """Optimizer updates in the run."""
    lr: float = 1e-3
    """Adam learning rate."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    student_action: Literal["greedy", "sample"] = "greedy"
    """imitation: the student acts greedily or samples from its policy."""
    buffer_frames: int = 32768
    """imitation: frames of labelled student rollouts kept for replay (the DAgger dataset)."""
    updates_per_batch: int = 4
    """imitation: optimizer updates on replayed slices per collected batch."""
    burn_in: int = 0
    """imitation: steps at the start of each replayed slice that refresh the stored hidden
    state without a loss (R2D2); burn_in + slice_len <= unroll_len."""
    dagger_beta: float = 0.0
    """imitation: probability that the bot, not the student, acts (DAgger's β) at update 0."""
    dagger_beta_updates: int = 0
    """imitation: updates over which β decays linearly to 0 (0: β stays constant)."""

    mop_preset: Literal["seed", "paper"] = "seed"
    """MoP preset the mop_* overrides apply to."""
    mop_layers: str | None = None
    """Expert sizes per block, e.g. "16,32,64;32,64,128" (default: the preset's)."""
    mop_intermediate_dim: int | None = None
    """MoP block width D (default: the preset's)."""
    mop_router_dim: int | None = None
    """MoP router hidden size R (default: the preset's)."""
    alpha: float = 1e-2
    """Routing-cost weight α (0 disables it), in the units cost_norm gives the cost."""
    cost_norm: Literal["block_max", "none"] = "block_max"
    """Routing cost per block divided by its largest expert's d^c (cost in [0, #blocks], α
    preset-independent: block_max) or the paper's raw Σ p·d^c (none)."""
    epsilon: float = 1e-2
    """ε of the performance-scaled routing cost."""
    cost_mode: Literal["scaled", "plain"] = "scaled"
    """Routing cost term: L + α·cost/(ε+L) (scaled) or L + α·cost (plain)."""
    dropout_beta: float = 0.8
    """Expert dropout strength β."""
    dropout_gamma: float = 0.1
    """Expert dropout threshold γ."""
    gru_hidden_size: int = 512
    """Hidden size of the GRU baseline core."""
    image_channels: int = 32
    """Encoder channels (cell embeddings, conv and FiLM layers)."""
    instr_dim: int = 64
    """Instruction GRU size."""

    demos: str | None = None
    """bc: directory of a demo buffer written by `mop-torchrl demos`."""
    batch_slices: int = 16
    """imitation, bc: sequences per optimizer update."""
    slice_len: int | None = None
    """imitation, bc: length of each sequence (its loss-bearing steps in imitation); default
    unroll_len - burn_in (imitation: whole collected rows), 32 (bc)."""

    init_checkpoint: str | None = None
    """ppo: start from this (imitation) checkpoint's weights."""
    ppo_epochs: int = 4
    """ppo: passes over each batch."""
    minibatches: int = 4
    """ppo: minibatches per pass (split along envs, sequences kept whole)."""
    clip_epsilon: float = 0.2
    """ppo: clipping range."""
    gamma: float = 0.99
    """ppo: discount."""
    gae_lambda: float = 0.95
    """ppo: GAE λ."""
    entropy_coef: float = 0.01
    """ppo: entropy bonus."""
    critic_coef: float = 0.5
    """ppo: value loss weight."""

    run_dir: str = "runs"
    """Parent directory of run directories."""
    run_name: str | None = None
    """Run directory name (default: <algo>-<policy>-<level>-s<seed>)."""
    log_interval: int = 10
    """Updates between log lines."""
    checkpoint_interval: int = 50
    """Updates between checkpoints (one is also written at the end)."""
    eval_episodes: int = 100
    """Episodes of greedy evaluation at the end of the run (0 skips it)."""
    eval_interval: int = 0
    """Updates between held-out evaluations during training, logged as eval/* (success and the
    grounding probe); 0: only the final evaluation."""
    eval_interval_episodes: int = 50
    """Episodes of each evaluation during training (and bot episodes of its grounding probe)."""
    logger: Literal["csv", "tensorboard", "wandb", "mlflow"] = "csv"
    """TorchRL logger for the scalars (wandb runs offline; wandb/mlflow must be installed)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, _coerce(field, getattr(self, field.name)))
        positive = ["num_envs", "unroll_len", "num_updates", "log_interval", "checkpoint_interval"]
        positive += ["gru_hidden_size", "image_channels", "instr_dim", "batch_slices"]
        positive += ["ppo_epochs", "minibatches", "torch_threads", "num_workers"]
        positive += ["updates_per_batch"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"config key {name!r} must be > 0, got {getattr(self, name)!r}")
        for name in ("lr", "max_grad_norm", "clip_epsilon"):
            if not getattr(self, name) > 0:
                raise ValueError(f"config key {name!r} must be > 0, got {getattr(self, name)!r}")
        for name in ("gamma", "gae_lambda"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(
                    f"config key {name!r} must be in [0, 1], got {getattr(self, name)}"
                )
        if self.slice_len is None:
            self.slice_len = self.unroll_len - self.burn_in if self.algo == "imitation" else 32
        if self.slice_len <= 0:
            raise ValueError(f"config key 'slice_len' must be > 0, got {self.slice_len}")
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
            if not 0 <= self.dagger_beta <= 1 or self.dagger_beta_updates < 0:
                raise ValueError(
                    f"config keys 'dagger_beta' ({self.dagger_beta}) must be in [0, 1] and "
                    f"'dagger_beta_updates' ({self.dagger_beta_updates}) >= 0"
                )
            if self.dagger_beta > 0 and self.backend != "inprocess":
                raise ValueError("config key 'dagger_beta' > 0 needs backend 'inprocess'")
        if self.eval_interval < 0 or self.eval_interval_episodes <= 0:
            raise ValueError(
                f"config keys 'eval_interval' ({self.eval_interval}) must be >= 0 and "
                f"'eval_interval_episodes' ({self.eval_interval_episodes}) > 0"
            )
        if self.eval_episodes < 0:
            raise ValueError(f"config key 'eval_episodes' must be >= 0, got {self.eval_episodes}")
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
        if self.mop_layers is not None:
            try:
                self.mop_layers = format_layers(parse_layers(self.mop_layers))
            except ValueError as err:
                raise ValueError(f"config key 'mop_layers': {err}") from None
        self.mop_config()  # validates the MoP values, naming the key

    def mop_config(self) -> MoPConfig:
        """The MoP core config (``input_dim`` is set by the policy builder)."""
        overrides = {
            "layers": self.mop_layers,
            "intermediate_dim": self.mop_intermediate_dim,
            "router_dim": self.mop_router_dim,
            "alpha": self.alpha,
            "cost_norm": self.cost_norm,
            "epsilon": self.epsilon,
            "cost_mode": self.cost_mode,
            "dropout_beta": self.dropout_beta,
            "dropout_gamma": self.dropout_gamma,
        }
        return MoPConfig.from_preset(
            self.mop_preset, **{k: v for k, v in overrides.items() if v is not None}
        )

    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig(image_channels=self.image_channels, instr_dim=self.instr_dim)

    @property
    def levels(self) -> list[str]:
        """The ``task_id`` levels as given (one, or several for multi-level training)."""
        return [name.strip() for name in self.task_id.split(",") if name.strip()]

    @property
    def name(self) -> str:
        levels = self.levels
        level = levels[0].removeprefix("BabyAI-").removesuffix("-v0")
        if len(levels) > 1:
            level = f"{len(levels)}levels"
        return self.run_name or f"{self.algo}-{self.policy}-{level}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        return cls(**data)


_LIST_KEYS = ("task_id", "level_weights")
"""String keys that also accept a YAML list, stored comma-separated."""


def _coerce(field: dataclasses.Field, value: Any) -> Any:
    """Checks ``value`` against the field's annotation; ints are accepted for floats."""
    hint = typing.get_type_hints(TrainConfig)[field.name]
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if typing.get_origin(option) is Literal:
            if value in typing.get_args(option):
                return value
        elif option is float and isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"config key {field.name!r} must be finite, got {value!r}")
            return float(value)
        elif (
            (option is int and isinstance(value, int) and not isinstance(value, bool))
            or (option is bool and isinstance(value, bool))
            or (option is str and isinstance(value, str))
        ):
            return value
        elif option is str and field.name == "mop_layers" and isinstance(value, list):
            return format_layers(parse_layers(value))  # the YAML list form
        elif option is str and field.name in _LIST_KEYS and isinstance(value, list):
            return ",".join(str(item) for item in value)  # the YAML list form
    expected = " or ".join(
        repr(list(typing.get_args(o))) if typing.get_origin(o) is Literal else o.__name__
        for o in options
    )
    raise ValueError(f"config key {field.name!r} must be {expected}, got {value!r}")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one ``--<field>`` flag per ``TrainConfig`` field (default: not given)."""
    hints = typing.get_type_hints(TrainConfig)
    docs = _field_docs()
    for field in dataclasses.fields(TrainConfig):
        options = typing.get_args(hints[field.name])
        hint = hints[field.name]
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": docs.get(field.name, "")}
        if typing.get_origin(hint) is Literal:
            kwargs["choices"] = list(typing.get_args(hint))
        else:
            base = next(o for o in (options or (hint,)) if o is not type(None))
            kwargs["type"] = base
        parser.add_argument(f"--{field.name}", **kwargs)


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Reads a YAML config (optional) and applies overrides; errors name the offending key."""
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
        data.update(loaded)
    data.update(overrides or {})
    return TrainConfig.from_dict(data)


def _field_docs() -> dict[str, str]:
    """Field docstrings (the string literal after each field) for ``--help``."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, following in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            docs[node.target.id] = following.value.value
    return docs
