"""The Mixture-of-Pathways core: config, math, fused GRU kernels and the TorchRL module.

Depends on torch, tensordict and torchrl only (no gymnasium, no minigrid): this is what a TorchRL
user drops into their own pipeline in place of ``GRUModule``.
"""

from mop_torchrl.core.config import PRESETS, MoPConfig, format_layers, parse_layers
from mop_torchrl.core.model import MoPCore, grouped_routing_cost_loss, routing_cost_loss
from mop_torchrl.core.module import MoPModule

__all__ = [
    "PRESETS",
    "MoPConfig",
    "MoPCore",
    "MoPModule",
    "format_layers",
    "grouped_routing_cost_loss",
    "parse_layers",
    "routing_cost_loss",
]
