"""Packed GRUs for accelerators: a MoP block's GRUs run as one GRU, on ``nn.GRU`` parameters.

:mod:`mop_torchrl.core.model` builds the ``"packed"`` implementation on these; this module
imports nothing from it. On a GPU the fused and reference paths are launch-bound (about 150
small kernels per step on an H200, ``docs/benchmarks.md``); here a block's router and experts
(hidden sizes ``h_0 .. h_m``, router first) become one GRU of hidden size ``H = Σ h_j``:

* **State**: the concatenation ``[h_router, h_expert1, ...]`` ``[N, H]``; each GRU's state is a
  view of it, so the TorchRL module's per-key states need no copy on the way out.
* **Gate-major rows**: the packed gates are ``[r_0 .. r_m | z_0 .. z_m | n_0 .. n_m]``, so ``r``,
  ``z`` and ``n`` are contiguous ``[N, H]`` chunks lined up with the state and the gate math is
  the plain GRU formula on ``[N, H]`` tensors: one fused kernel (``torch.gru_cell`` on CUDA,
  or what inductor makes of the written-out formula under ``torch.compile``).
* **One product for all input gates**: ``W_ih`` is the row concatenation of the GRUs' input
  weights in that order ``[3H, D]``, and over a sequence it runs once for every step.
* **One product for all hidden gates**: ``W_hh`` is block-diagonal ``[3H, H]`` (per gate, each
  GRU's ``[h_j, h_j]`` block on the diagonal). Chosen over a batched product on experts padded to
  the largest size because, for the size ladders MoP uses (each expert twice the last), both
  compute about the same number of multiply-adds (seed preset, block 1: ``3·512²`` block-diagonal
  vs ``4·3·256²`` padded, both 2.9x the useful ``Σ 3h_j²``), while padding would also pad the
  input-gate product (2x its useful work), the states (a gather and a scatter per step) and the
  per-expert LayerNorm (masks); block-diagonal keeps one plain GEMM and flat ``[N, H]`` tensors.
  Over a sequence the packed GRU runs as one :func:`~mop_torchrl.core.fused.gru_scan` (resets by
  ``where``, no padding, hand-written backward) instead of one scan per GRU.

The packed weights are assembled from the ``nn.GRU`` parameters on every call (a few copies of
~1 MB per block, no kernels per expert beyond one pad): nothing is cached, so the state dict is
unchanged, gradients reach the original parameters, and a CUDA graph or compiled graph that
captures the step also captures the packing and always sees the current weights (in-place
optimiser steps, ``load_state_dict``, a collector's weight updates through ``.data``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mop_torchrl.core.fused import functorch_active, gru_gates, gru_scan

__all__ = ["PackedGRU", "pack_grus", "packed_gru_cell", "packed_gru_recurrence"]


class PackedGRU(NamedTuple):
    """Several single-layer GRUs reading the same input, as one GRU (gate-major rows)."""

    w_ih: torch.Tensor
    """Input weights ``[3H, D]``, rows ``[r_0 .. r_m, z_0 .. z_m, n_0 .. n_m]``."""
    w_hh: torch.Tensor
    """Block-diagonal hidden weights ``[3H, H]``, same row order."""
    b_ih: torch.Tensor
    """Input biases ``[3H]``."""
    b_hh: torch.Tensor
    """Hidden biases ``[3H]``."""
    sizes: tuple[int, ...]
    """Hidden size of each GRU, in order; ``H = sum(sizes)``."""


def pack_grus(grus: list[nn.GRU]) -> PackedGRU:
    """The packed form of ``grus`` (differentiable in their parameters; no in-place writes, so
    it also runs under ``torch.vmap`` over stacked parameter sets).

    Examples:
        >>> import torch
        >>> grus = [torch.nn.GRU(3, 2), torch.nn.GRU(3, 4)]
        >>> packed = pack_grus(grus)
        >>> packed.w_ih.shape, packed.w_hh.shape, packed.sizes
        (torch.Size([18, 3]), torch.Size([18, 6]), (2, 4))
        >>> x, h = torch.randn(5, 3), [torch.randn(5, 2), torch.randn(5, 4)]
        >>> out = packed_gru_cell(x, torch.cat(h, -1), packed).split(packed.sizes, -1)
        >>> expected = [g(x[None], s[None])[1][0] for g, s in zip(grus, h)]
        >>> all(torch.allclose(o, e, atol=1e-6) for o, e in zip(out, expected))
        True
    """
    sizes = tuple(g.hidden_size for g in grus)
    total = sum(sizes)

    def gate_major(name: str, *columns: int) -> torch.Tensor:
        """The named parameter's rows in gate-major order: each GRU's ``[3h, *columns]`` viewed
        as ``[3, h, *columns]``, one ``cat`` along ``h`` (a step's packing is per-op overhead
        at small sizes: this is ~3x fewer ops than slicing every gate of every GRU)."""
        views = [getattr(g, name).view(3, h, *columns) for g, h in zip(grus, sizes)]
        return torch.cat(views, 1).view(3 * total, *columns)

    blocks, offset = [], 0
    for gru, size in zip(grus, sizes):
        # [3h, h] -> [3, h, h] (one block per gate) -> columns padded to [3, h, H].
        blocks.append(F.pad(gru.weight_hh_l0.view(3, size, size), (offset, total - offset - size)))
        offset += size
    w_hh = torch.cat(blocks, 1).view(3 * total, total)
    w_ih = gate_major("weight_ih_l0", grus[0].input_size)
    return PackedGRU(w_ih, w_hh, gate_major("bias_ih_l0"), gate_major("bias_hh_l0"), sizes)


def packed_gru_cell(x: torch.Tensor, h: torch.Tensor, packed: PackedGRU) -> torch.Tensor:
    """One step of the packed GRU: ``x [N, D]``, ``h [N, H]`` -> ``[N, H]``.

    Eager: ``torch.gru_cell`` (two products and, on CUDA, one fused gate kernel). Under
    ``torch.compile`` and torch.func transforms the gate math is written out, so that inductor
    fuses it with the ops around it (``gru_cell`` would be an opaque kernel) and vmap can batch
    it (``gru_cell`` has no batching rule).
    """
    if not (functorch_active() or torch.compiler.is_compiling()):
        return torch.gru_cell(x, h, packed.w_ih, packed.w_hh, packed.b_ih, packed.b_hh)
    return gru_gates(
        F.linear(x, packed.w_ih, packed.b_ih), F.linear(h, packed.w_hh, packed.b_hh), h
    )


def packed_gru_recurrence(
    grus: list[nn.GRU],
    x: torch.Tensor,
    states: list[torch.Tensor],
    starts: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """:func:`~mop_torchrl.core.fused.gru_recurrence` with the GRUs packed into one.

    ``x`` is ``[S, L, D]``. Without ``starts``, ``states`` are the initial states ``[S, h]``;
    with ``starts [S, L]`` (bool, true at ``t=0``) they are ``[S, L, h]`` and each sequence
    restarts from ``states[:, t]`` wherever ``starts[:, t]``. Returns the state after every
    step, one ``[S, L, h]`` view per GRU of a single ``[S, L, H]`` tensor.
    """
    packed = pack_grus(grus)
    if starts is None and x.shape[1] == 1:
        out = packed_gru_cell(x[:, 0], torch.cat(states, -1), packed).unsqueeze(1)
    else:
        if starts is None:
            starts = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
            starts[:, 0] = True
            states = [h.unsqueeze(1).expand(-1, x.shape[1], -1) for h in states]
        gi = F.linear(x, packed.w_ih, packed.b_ih)
        out = gru_scan(gi, torch.cat(states, -1), starts, packed.w_hh, packed.b_hh)
    return list(out.split(packed.sizes, -1))
