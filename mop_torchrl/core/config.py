"""Configuration of the Mixture-of-Pathways core: layer specs, presets, validation.

A layer spec lists, per block, the hidden sizes of its experts. Blocks are separated by ``;``
and expert sizes by ``,`` (``"32,64,128;64,128,256"``); a list of per-block strings
(``["32,64,128", "64,128,256"]``, the YAML form) or of integer lists means the same thing.
Size ``0`` is an identity ("skip") expert with no hidden state.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, Literal

__all__ = ["PRESETS", "MoPConfig", "format_layers", "parse_layers"]

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


@dataclasses.dataclass
class MoPConfig:
    """Hyper-parameters of a Mixture-of-Pathways core (SPEC section 2).

    Examples:
        >>> cfg = MoPConfig.from_preset("seed", input_dim=128)
        >>> cfg.layers
        [[32, 64, 128], [64, 128, 256]]
        >>> MoPConfig.from_dict(cfg.to_dict()) == cfg
        True
        >>> MoPConfig(input_dim=8, layers="16,32;;8")
        Traceback (most recent call last):
        ...
        ValueError: invalid layer spec '16,32;;8': block 1 is empty
    """

    input_dim: int = 128
    """Width of the encoded observation fed to the core."""
    layers: Any = dataclasses.field(default_factory=lambda: [[32, 64, 128], [64, 128, 256]])
    """Expert hidden sizes per block (a layer spec; parsed to ``list[list[int]]``)."""
    intermediate_dim: int = 256
    """Common width ``D`` of block inputs and outputs."""
    router_dim: int = 64
    """Hidden size ``R`` of each block's router GRU."""
    expert_norm: Literal["layer", "none"] = "layer"
    """Norm on expert hidden states before the output projection (LayerNorm, not BatchNorm:
    BatchNorm would couple the envs of a batch and break step/sequence equivalence)."""
    dropout_beta: float = 0.8
    """Expert dropout strength ``β`` (training only; 0 disables)."""
    dropout_gamma: float = 0.1
    """Expert dropout threshold ``γ``: experts with weight below it may be dropped."""
    cost_exponent: float = 2.0
    """Exponent ``c`` of the routing cost ``Σ p_i d_i^c``."""
    cost_norm: Literal["block_max", "none"] = "block_max"
    """``block_max``: each block's cost is divided by its largest expert's ``d^c``, so the
    cost lies in ``[0, num_blocks]`` and ``α`` means the same for every preset; ``none``: the
    paper's raw ``Σ p_i d_i^c``."""
    alpha: float = 1e-2
    """Routing-cost weight ``α`` in the loss (0 disables the cost term). The default is the
    paper's pressure (α=1e-5 on raw costs whose largest expert costs 32² = 1024 per block)
    expressed in normalised units: 1e-5 × 1024 ≈ 1e-2."""
    epsilon: float = 1e-2
    """``ε`` in the performance-scaled cost ``α·cost/(ε + L)``."""
    cost_mode: Literal["scaled", "plain"] = "scaled"
    """``scaled``: ``L + α·cost/(ε+L)`` (the paper); ``plain``: ``L + α·cost``."""

    def __post_init__(self) -> None:
        self.layers = parse_layers(self.layers)
        for name in ("input_dim", "intermediate_dim", "router_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MoPConfig.{name} must be a positive integer, got {value!r}")
        if self.expert_norm not in ("layer", "none"):
            raise ValueError(
                f"MoPConfig.expert_norm must be 'layer' or 'none', got {self.expert_norm!r}"
            )
        if self.cost_norm not in ("block_max", "none"):
            raise ValueError(
                f"MoPConfig.cost_norm must be 'block_max' or 'none', got {self.cost_norm!r}"
            )
        if self.cost_mode not in ("scaled", "plain"):
            raise ValueError(
                f"MoPConfig.cost_mode must be 'scaled' or 'plain', got {self.cost_mode!r}"
            )
        if not 0.0 < self.dropout_gamma <= 1.0:
            raise ValueError(
                f"MoPConfig.dropout_gamma must be in (0, 1], got {self.dropout_gamma!r}"
            )
        if not 0.0 <= self.dropout_beta <= 1.0:
            raise ValueError(f"MoPConfig.dropout_beta must be in [0, 1], got {self.dropout_beta!r}")
        if not 0 <= self.alpha < float("inf"):
            raise ValueError(f"MoPConfig.alpha must be finite and >= 0, got {self.alpha!r}")
        if not 0 < self.epsilon < float("inf"):
            raise ValueError(f"MoPConfig.epsilon must be finite and > 0, got {self.epsilon!r}")
        if not 0 <= self.cost_exponent < float("inf"):
            raise ValueError(
                f"MoPConfig.cost_exponent must be finite and >= 0, got {self.cost_exponent!r}"
            )

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
