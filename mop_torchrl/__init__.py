"""Mixture-of-Pathways recurrent policies for TorchRL, trained on BabyAI.

Layers, each importing only the ones before it: :mod:`mop_torchrl.core` (the MoP module),
:mod:`mop_torchrl.babyai` (envs, bot, encoder, demos), :mod:`mop_torchrl.train` (loops, losses,
checkpoints, evaluation), :mod:`mop_torchrl.analysis` (routing tables and plots), and the
``mop-torchrl`` command line (:mod:`mop_torchrl.cli`, :mod:`mop_torchrl.bench`) on top.
"""

from mop_torchrl.core import MoPConfig, MoPCore, MoPModule, parse_layers, routing_cost_loss

__all__ = ["MoPConfig", "MoPCore", "MoPModule", "parse_layers", "routing_cost_loss"]
__version__ = "0.3.0"
