"""Configuration of the Mixture-of-Pathways core: layer specs, presets, validation.

A layer spec lists, per block, the hidden sizes of its experts. Blocks are separated by ``;``
and expert sizes by ``,`` (``"32,64,128;64,128,256"``); a list of per-block strings
(``["32,64,128", "64,128,256"]``, the YAML form) or of integer lists means the same thing.
Size ``0`` is an identity ("skip") expert with no hidden state.

The config dataclasses of the package (:class:`MoPConfig` here, the encoder's and the training
config above it) share :func:`setting` (a field with its help text in its metadata),
:func:`check_fields` (the type checks every config runs in ``__post_init__``) and
:class:`ConfigError` (an error that names the key).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_RL_ALPHA",
    "PRESETS",
    "ConfigError",
    "MoPConfig",
    "check_fields",
    "format_layers",
    "parse_layers",
    "setting",
]

_SIZE = re.compile(r"^\s*(\d+)\s*$")

LayerSpec = str | Sequence[str] | Sequence[Sequence[int]]


def _parse_block(text: str, spec: str, index: int) -> list[int]:
    if not text.strip():
        raise ValueError(f"invalid layer spec {spec!r}: block {index} is empty")
    sizes = []
    for token in text.split(","):
        match = _SIZE.match(token)
        if match is None:
            what = "an empty expert size" if not token.strip() else f"expert size {token.strip()!r}"
            raise ValueError(
                f"invalid layer spec {spec!r}: block {index} ({text!r}) has {what}; "
                "expert sizes are non-negative integers (0 = identity expert)"
            )
        sizes.append(int(match.group(1)))
    return sizes


def parse_layers(spec: LayerSpec) -> list[list[int]]:
    """Parses a layer spec into a list of per-block expert sizes.

    Examples:
        >>> parse_layers("32,64,128;64,128,256")
        [[32, 64, 128], [64, 128, 256]]
        >>> parse_layers(["0,16,32", "0,16,32"])
        [[0, 16, 32], [0, 16, 32]]
        >>> parse_layers("32,,64")
        Traceback (most recent call last):
        ...
        ValueError: invalid layer spec '32,,64': block 0 ('32,,64') has an empty expert size; expert sizes are non-negative integers (0 = identity expert)
    """
    if isinstance(spec, str):
        if not spec.strip():
            raise ValueError("invalid layer spec '': it has no block")
        return [_parse_block(block, spec, i) for i, block in enumerate(spec.split(";"))]
    if not isinstance(spec, Sequence) or len(spec) == 0:
        raise ValueError(f"invalid layer spec {spec!r}: expected a string or a non-empty list")
    blocks = []
    for i, block in enumerate(spec):
        if isinstance(block, str):
            if ";" in block:
                raise ValueError(
                    f"invalid layer spec {spec!r}: list item {block!r} holds several blocks"
                )
            blocks.append(_parse_block(block, block, i))
        elif isinstance(block, Sequence) and len(block) > 0:
            sizes = []
            for size in block:
                if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                    raise ValueError(
                        f"invalid layer spec {spec!r}: block {i} has expert size {size!r}; "
                        "expert sizes are non-negative integers (0 = identity expert)"
                    )
                sizes.append(size)
            blocks.append(sizes)
        else:
            raise ValueError(f"invalid layer spec {spec!r}: block {i} ({block!r}) is empty")
    return blocks


def format_layers(layers: Sequence[Sequence[int]]) -> str:
    """Inverse of :func:`parse_layers`: ``[[16, 32], [32, 64]] -> "16,32;32,64"``."""
    return ";".join(",".join(str(size) for size in block) for block in layers)


DEFAULT_ALPHA = 1e-2
"""The routing-cost weight ``α`` the package uses by default for imitation (the scaled form
``L + α·cost/(ε+L)`` on a cross-entropy), in the units ``cost_norm="block_max"`` gives the
cost: the paper's pressure (α=1e-5 on raw costs whose largest expert costs 32² = 1024 per
block) expressed in normalised units, 1e-5 × 1024 ≈ 1e-2. With the cross-entropy near its floor
(``L ≈ 0.35``) a unit of cost weighs ``α/(ε+L) ≈ 0.03``. The training config and the imitation
example take their default from here."""

DEFAULT_RL_ALPHA = 1e-2
"""The routing-cost weight ``α`` for RL losses (PPO, DQN), in the **plain** form
``L + α·cost`` (same units as :data:`DEFAULT_ALPHA`): a unit of cost weighs ``α``, about a third
of what imitation gives it at its cross-entropy floor. An RL objective is not a positive
performance measure (a PPO total was ≤ 0 in 5% of minibatches on masked CartPole), so the
scaled form does not apply (``routing_cost_loss`` refuses a negative ``L``). On masked
CartPole (5,120 frames, one seed) plain α=1e-2 kept every block's routing mixed and learnt as
α=0 did, where the scaled form at α=1e-2 sent the routers to the identity expert and did not
learn: measurements in docs/training.md. ``train --algo ppo`` and the RL examples use it,
except the masked CartPole PPO recipe, which sets 3e-2 (faster there over 7 seeds,
docs/classic_pomdp.md)."""


def setting(default: Any, doc: str, **metadata: Any) -> Any:
    """A dataclass field with a default, its help text (``metadata["help"]``) and any other
    marks (``resumable=True``), so that the command line and the docs read them, not the source.
    (Fields with a mutable default use ``dataclasses.field(default_factory=..., metadata=...)``.)

    Examples:
        >>> @dataclasses.dataclass
        ... class Example:
        ...     size: int = setting(3, "How many.")
        >>> dataclasses.fields(Example)[0].metadata["help"]
        'How many.'
    """
    return dataclasses.field(default=default, metadata={"help": doc, **metadata})


class ConfigError(ValueError):
    """A config value that is not allowed, naming its key.

    A config that holds another re-raises its errors :meth:`within` its own key, so a bad
    nested value reads ``config key 'mop.layers': ...``.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key, self.problem = key, problem
        separator = " " if problem.startswith("must") else ": "
        super().__init__(f"config key {key!r}{separator}{problem}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.key, self.problem)

    def within(self, section: str) -> ConfigError:
        """The same error with the key prefixed by the containing section."""
        return ConfigError(f"{section}.{self.key}", self.problem)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(config: Any) -> None:
    """Checks every field of a config dataclass against its annotation, in place.

    ``Literal[...]`` values must be one of the choices, ``int`` an int (not a bool), ``float``
    a finite number (ints become floats), ``str``/``bool`` exactly that, ``X | None`` also
    ``None``, a dataclass type an instance of it; ``Any`` is left to the class. Errors are
    :class:`ConfigError` naming the field.

    Examples:
        >>> @dataclasses.dataclass
        ... class Example:
        ...     rate: float = 0.5
        ...     def __post_init__(self):
        ...         check_fields(self)
        >>> Example(rate=1).rate
        1.0
        >>> Example(rate="fast")
        Traceback (most recent call last):
        ...
        mop_torchrl.core.config.ConfigError: config key 'rate' must be float, got 'fast'
    """
    hints = _type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        setattr(config, field.name, _checked(field.name, hints[field.name], value))


def _checked(name: str, hint: Any, value: Any) -> Any:
    if hint is Any:
        return value
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    options = typing.get_args(hint) if union else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if typing.get_origin(option) is Literal:
            if value in typing.get_args(option) and not isinstance(value, bool):
                return value
        elif option is float and isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(name, f"must be finite, got {value!r}")
            return float(value)
        elif (
            (option is int and isinstance(value, int) and not isinstance(value, bool))
            or (option in (str, bool) and type(value) is option)
            or (dataclasses.is_dataclass(option) and isinstance(value, option))
        ):
            return value
    raise ConfigError(name, f"must be {_describe(options)}, got {value!r}")


def _describe(options: tuple[Any, ...]) -> str:
    return " or ".join(
        repr(list(typing.get_args(o))) if typing.get_origin(o) is Literal else o.__name__
        for o in options
    )


@dataclasses.dataclass
class MoPConfig:
    """Hyper-parameters of a Mixture-of-Pathways core (SPEC section 2).

    The architecture only: the routing-cost objective's settings (``α``, ``ε``, scaled or plain)
    belong to the loss that uses the cost (``routing_cost_loss``, the training config). Each
    field's help text is in its metadata (``metadata["help"]``), which ``--help`` shows.

    Examples:
        >>> cfg = MoPConfig.from_preset("seed", input_dim=128)
        >>> cfg.layers
        [[32, 64, 128], [64, 128, 256]]
        >>> MoPConfig.from_dict(cfg.to_dict()) == cfg
        True
        >>> MoPConfig(input_dim=8, layers="16,32;;8")
        Traceback (most recent call last):
        ...
        mop_torchrl.core.config.ConfigError: config key 'layers': invalid layer spec '16,32;;8': block 1 is empty
    """

    input_dim: int = setting(
        128,
        "Width of the encoded observation fed to the core (a policy builder sets it from its "
        "encoder's output width).",
    )
    layers: Any = dataclasses.field(
        default_factory=lambda: [[32, 64, 128], [64, 128, 256]],
        metadata={
            "help": 'Expert hidden sizes per block, e.g. "16,32,64;32,64,128" (0: identity expert).'
        },
    )
    intermediate_dim: int = setting(256, "Common width D of block inputs and outputs.")
    router_dim: int = setting(64, "Hidden size R of each block's router GRU.")
    expert_norm: Literal["layer", "none"] = setting(
        "layer",
        "Norm on expert hidden states before the output projection (LayerNorm, not BatchNorm: "
        "BatchNorm would couple the envs of a batch and break step/sequence equivalence).",
    )
    dropout_beta: float = setting(0.8, "Expert dropout strength β (training only; 0 disables).")
    dropout_gamma: float = setting(
        0.1, "Expert dropout threshold γ: experts with weight below it may be dropped."
    )
    cost_exponent: float = setting(2.0, "Exponent c of the routing cost Σ p_i d_i^c.")
    cost_norm: Literal["block_max", "none"] = setting(
        "block_max",
        "block_max: each block's cost is divided by its largest expert's d^c, so the cost lies "
        "in [0, #blocks] and α means the same for every preset; none: the paper's raw Σ p·d^c.",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        try:
            self.layers = parse_layers(self.layers)
        except ValueError as err:
            raise ConfigError("layers", str(err)) from None
        for name in ("input_dim", "intermediate_dim", "router_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.dropout_gamma <= 1.0:
            raise ConfigError("dropout_gamma", f"must be in (0, 1], got {self.dropout_gamma}")
        if not 0.0 <= self.dropout_beta <= 1.0:
            raise ConfigError("dropout_beta", f"must be in [0, 1], got {self.dropout_beta}")
        if self.cost_exponent < 0:
            raise ConfigError("cost_exponent", f"must be >= 0, got {self.cost_exponent}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MoPConfig:
        """Builds a config from a named preset (``"seed"`` or ``"paper"``) plus overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown MoP preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """A YAML-friendly dict (layers as a spec string)."""
        out = dataclasses.asdict(self)
        out["layers"] = format_layers(self.layers)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoPConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MoPConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    @property
    def num_blocks(self) -> int:
        return len(self.layers)


PRESETS: dict[str, dict[str, Any]] = {
    # The BabyAI integration's configuration.
    "seed": {"layers": "32,64,128;64,128,256", "intermediate_dim": 256, "router_dim": 64},
    # The paper's heterogeneous blocks with an identity expert.
    "paper": {"layers": "0,16,32;0,16,32;0,16,32", "intermediate_dim": 64, "router_dim": 64},
}
