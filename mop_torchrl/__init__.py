"""Mixture-of-Pathways recurrent policies for TorchRL, trained on BabyAI."""

from mop_torchrl.config import MoPConfig, parse_layers
from mop_torchrl.model import MoPCore, routing_cost_loss
from mop_torchrl.module import MoPModule

__all__ = ["MoPConfig", "MoPCore", "MoPModule", "parse_layers", "routing_cost_loss"]
__version__ = "0.1.0"
