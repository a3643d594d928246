"""Fused computation of a MoP block: one GRU call and one output projection per block.

The router and the experts of a block all read the same input, so they are one GRU whose
hidden state is the concatenation of theirs (``H = R + Σ d_i``): the input weights are stacked,
the recurrent weights are block-diagonal (off-diagonal blocks are constant zeros, so the GRUs
stay independent), and the gates are laid out ``[r_all, z_all, n_all]`` as ``torch.gru``
expects. The weighted sum of expert projections ``Σ_i w_i (W_i a_i + b_i)`` is one product
``(a ⊙ w_units) W_catᵀ + w B``.

The fused weights are *assembled* from the per-expert ``nn.GRU``/``nn.Linear`` parameters at
every call (so gradients, optimizers and checkpoints see ordinary parameters) and cached while
autograd is off and the parameters are unchanged (collection, evaluation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from mop_torchrl.model import MoPBlock

__all__ = ["block_mix", "block_recurrence", "fused_weights"]


def _assemble(block: MoPBlock) -> dict[str, torch.Tensor]:
    grus = [block.router] + [block.experts[i].gru for i in block.stateful_experts]
    sizes = [gru.hidden_size for gru in grus]
    dim = block.router.input_size
    w_ih = torch.cat([g.weight_ih_l0.view(3, h, dim) for g, h in zip(grus, sizes)], 1)
    w_hh = torch.cat(
        [
            torch.block_diag(*[g.weight_hh_l0.view(3, h, h)[gate] for g, h in zip(grus, sizes)])
            for gate in range(3)
        ]
    )
    projections = [block.experts[i].proj for i in block.stateful_experts]
    return {
        "w_ih": w_ih.reshape(-1, dim),
        "w_hh": w_hh,
        "b_ih": torch.cat([g.bias_ih_l0.view(3, h) for g, h in zip(grus, sizes)], 1).reshape(-1),
        "b_hh": torch.cat([g.bias_hh_l0.view(3, h) for g, h in zip(grus, sizes)], 1).reshape(-1),
        "proj_w": torch.cat([p.weight for p in projections], 1)
        if projections
        else torch.zeros(dim, 0, device=block.router.weight_ih_l0.device),
        "proj_b": torch.stack([p.bias for p in projections])
        if projections
        else torch.zeros(0, dim, device=block.router.weight_ih_l0.device),
    }


def fused_weights(block: MoPBlock) -> dict[str, torch.Tensor]:
    """The block's fused weights; cached when autograd is off and parameters are unchanged."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return _assemble(block)
    key = tuple((p.data_ptr(), p._version) for p in block.parameters())
    cache = block.__dict__.get("_fused_cache")
    if cache is None or cache[0] != key:
        cache = (key, _assemble(block))
        block.__dict__["_fused_cache"] = cache
    return cache[1]


def block_recurrence(
    block: MoPBlock, x: torch.Tensor, states: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Runs router and experts over ``x [S, L, D]`` from ``states`` (each ``[S, h]``).

    Returns the state after every step, one ``[S, L, h]`` tensor per GRU (router first).
    """
    w = fused_weights(block)
    h0 = torch.cat(states, -1)
    if x.shape[1] == 1:
        out = torch.gru_cell(x[:, 0], h0, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"]).unsqueeze(1)
    else:
        params = [w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"]]
        out, _ = torch.gru(x, h0.unsqueeze(0), params, True, 1, 0.0, block.training, False, True)
    return list(out.split(block.state_sizes, dim=-1))


def block_mix(
    block: MoPBlock, x: torch.Tensor, expert_states: list[torch.Tensor], weights: torch.Tensor
) -> torch.Tensor:
    """``LayerNorm(x + Σ_i w_i E_i)`` with all expert projections in one product."""
    w = fused_weights(block)
    total = x + (weights * block.identity_mask).sum(-1, keepdim=True) * x
    if expert_states:
        experts = [block.experts[i] for i in block.stateful_experts]
        acts = torch.cat([F.relu(e.norm(h)) for e, h in zip(experts, expert_states)], -1)
        unit_weights = weights.index_select(-1, block.unit_expert)
        total = total + F.linear(acts * unit_weights, w["proj_w"])
        total = total + weights.index_select(-1, block.stateful_index) @ w["proj_b"]
    return block.norm(total)
