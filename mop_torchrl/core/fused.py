"""Fast GRU kernels for the MoP blocks, on ``nn.GRU`` parameters (no knowledge of MoP).

:mod:`mop_torchrl.core.model` builds the blocks on these; this module imports nothing from it.
Why the code looks like this (measured on a 2-core CPU, seed preset, side by side):

* **One step** (step mode): one ``torch.gru_cell`` per router/expert. It beat a single GRU with
  block-diagonal recurrent weights (2-3x the recurrent FLOPs in zero blocks: 1.4-1.8x slower),
  per-GRU ``torch.gru`` (oneDNN), and a shared input product with the gate math in Python, at
  batch 64 to 1024. Reading the ``nn.GRU`` parameters directly leaves no assembled weights to
  cache or keep in sync, so a captured CUDA graph always sees the current parameters.
* **Sequences**: the input gates of all GRUs of a block are one product over every step; only
  ``h @ W_hhᵀ`` and the gate math run per step, in :class:`_GRUScan`, whose hand-written
  backward costs a few kernels per step and computes weight gradients as one product over all
  steps. Resets (``is_init``) are a ``where`` on the state, so nothing is padded: with 5% resets
  on ``[64, 32]``, segments padded to the longest one hold 2.5x the real rows, and the scan's
  forward+backward was ~2x faster than ``torch.gru`` on them. No data-dependent shapes, so no
  host-device sync either. (On a GPU the per-step loop should be launch-bound; not measured.)
  On a CPU in eager mode the steps without a reset are read on the host and skip the ``where``
  and its views: at PPO's ``[1, 128, 64]`` chunks forward+backward took 0.87-0.91x the time,
  with bitwise the same results.
* **functorch**: the scan is an ``autograd.Function`` in the ``setup_context`` style with its
  own ``vmap`` rule, so ``torch.vmap`` (TorchRL's value estimators, ensembles) runs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["functorch_active", "gru_cell", "gru_gates", "gru_recurrence", "gru_scan"]


def functorch_active() -> bool:
    """Whether a torch.func transform (``vmap``, ``grad``, ...) is tracing this call."""
    return torch._C._are_functorch_transforms_active()


def gru_cell(
    x: torch.Tensor,
    h: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor,
    b_hh: torch.Tensor,
) -> torch.Tensor:
    """One GRU step, ``torch.gru_cell`` (one kernel) except under torch.func transforms,
    where its gate math is written out (``gru_cell`` has no batching rule: vmap would loop)."""
    if not functorch_active():
        return torch.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)
    return gru_gates(F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh), h)


def gru_gates(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The GRU update from input gates ``gi`` and hidden gates ``gh`` (``[r, z, n]`` chunks)."""
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = gh.chunk(3, -1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (h - n)


def gru_recurrence(
    grus: list[nn.GRU],
    x: torch.Tensor,
    states: list[torch.Tensor],
    starts: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Runs several single-layer GRUs that read the same input ``x [S, L, D]``.

    Without ``starts``, ``states`` are the initial states ``[S, h]``. With ``starts [S, L]``
    (bool, true at ``t=0``), ``states`` are ``[S, L, h]`` and each sequence restarts from
    ``states[:, t]`` wherever ``starts[:, t]``. Returns the state after every step, one
    ``[S, L, h]`` tensor per GRU.
    """
    if starts is None and x.shape[1] == 1:
        return [
            gru_cell(
                x[:, 0], h, g.weight_ih_l0, g.weight_hh_l0, g.bias_ih_l0, g.bias_hh_l0
            ).unsqueeze(1)
            for g, h in zip(grus, states)
        ]
    if starts is None:
        starts = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        starts[:, 0] = True
        states = [h.unsqueeze(1).expand(-1, x.shape[1], -1) for h in states]
    w_ih = torch.cat([g.weight_ih_l0 for g in grus])
    b_ih = torch.cat([g.bias_ih_l0 for g in grus])
    input_gates = F.linear(x, w_ih, b_ih).split([3 * g.hidden_size for g in grus], -1)
    return [
        gru_scan(gi, stored, starts, g.weight_hh_l0, g.bias_hh_l0)
        for g, gi, stored in zip(grus, input_gates, states)
    ]


def gru_scan(
    gi: torch.Tensor,
    stored: torch.Tensor,
    starts: torch.Tensor,
    w_hh: torch.Tensor,
    b_hh: torch.Tensor,
) -> torch.Tensor:
    """One GRU over time with resets, from precomputed input gates (see :class:`_GRUScan`).

    Differentiable, and usable under ``torch.vmap`` (over data and/or weights).

    Examples:
        >>> import torch
        >>> gru = torch.nn.GRU(3, 4, batch_first=True)
        >>> x, h0 = torch.randn(2, 5, 3), torch.zeros(2, 4)
        >>> starts = torch.zeros(2, 5, dtype=torch.bool)
        >>> starts[:, 0] = True
        >>> gi = torch.nn.functional.linear(x, gru.weight_ih_l0, gru.bias_ih_l0)
        >>> out = gru_scan(gi, h0[:, None].expand(2, 5, 4), starts, gru.weight_hh_l0, gru.bias_hh_l0)
        >>> bool(torch.allclose(out, gru(x, h0[None])[0], atol=1e-6))
        True

    Under ``torch.autocast`` the recurrence runs in the weights' dtype: the input gates may
    arrive rounded to the autocast dtype, but the per-step products and the state do not round
    again over the steps. The gradient of ``w_hh`` is one product over all steps, like a
    ``Linear``'s weight gradient, and like it runs in the autocast dtype.
    """
    device = gi.device.type
    if torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            gi, stored = gi.to(w_hh.dtype), stored.to(w_hh.dtype)
            low = torch.get_autocast_dtype(device)
            return _GRUScan.apply(gi, stored, starts, w_hh, b_hh, low)[0]
    return _GRUScan.apply(gi, stored, starts, w_hh, b_hh)[0]


def _reset_steps(reset: torch.Tensor) -> list[bool]:
    """Per step of a time-major ``reset [L, S, 1]``, whether any row resets there. Read on the
    host only on a CPU in eager mode (free there), so the scan can skip the reset ``where``
    (and its views) on the other steps; elsewhere (a device sync, a graph break) every step
    counts."""
    if reset.device.type != "cpu" or functorch_active() or torch.compiler.is_compiling():
        return [True] * reset.shape[0]
    return reset.flatten(1).any(1).tolist()


class _GRUScan(torch.autograd.Function):
    """One GRU over time with resets, with input gates precomputed for all steps.

    ``forward(gi [S, L, 3h], stored [S, L, h], starts [S, L], w_hh, b_hh) -> [S, L, h]``: the
    state entering step ``t`` is ``stored[:, t]`` where ``starts[:, t]`` (always at ``t=0``) and
    the previous step's output elsewhere; ``gi = W_ih x + b_ih`` in ``nn.GRU``'s ``[r, z, n]``
    gate order. The backward is hand-written so that each step costs a few fused kernels
    instead of an autograd graph per step. ``grad_dtype`` (optional): the dtype of the weight
    gradient's product (autocast's), else ``w_hh``'s.
    """

    @staticmethod
    def forward(gi, stored, starts, w_hh, b_hh, grad_dtype=None):
        size = w_hh.shape[1]
        gi, stored = gi.transpose(0, 1), stored.transpose(0, 1)  # time-major views
        reset = starts.transpose(0, 1).unsqueeze(-1)
        steps, batch = reset.shape[:2]
        gh = gi.new_empty(steps, batch, 3 * size)
        rz = gi.new_empty(steps, batch, 2 * size)
        n = gi.new_empty(steps, batch, size)
        out = gi.new_empty(steps, batch, size)
        # Per-step views are made up front: indexing in the loop costs as much as the math.
        gi_rz, gi_n = gi.split([2 * size, size], -1)
        gh_rz, gh_n = gh.split([2 * size, size], -1)
        r, z = rz.split(size, -1)
        per_step = (gh, gi_rz, gh_rz, rz, gi_n, r, gh_n, n, z, out)
        resets = _reset_steps(reset)
        w_hh_t, h = w_hh.t(), stored[0]
        for t, (gh_t, gi_rz_t, gh_rz_t, rz_t, gi_n_t, r_t, gh_n_t, n_t, z_t, out_t) in enumerate(
            zip(*(v.unbind(0) for v in per_step))
        ):
            if resets[t]:
                h = torch.where(reset[t], stored[t], h)
            torch.addmm(b_hh, h, w_hh_t, out=gh_t)
            torch.add(gi_rz_t, gh_rz_t, out=rz_t).sigmoid_()
            torch.addcmul(gi_n_t, r_t, gh_n_t, out=n_t).tanh_()
            h = torch.lerp(n_t, h, z_t, out=out_t)  # n + z (h_in - n)
        # The state entering each step, for the backward: two ops for all steps.
        h_in = torch.where(reset, stored, torch.cat([stored[:1], out[:-1]]))
        # The intermediates are outputs (setup_context style, which torch.func needs).
        return out.transpose(0, 1), h_in, gh_n, rz, n

    @staticmethod
    def setup_context(ctx, inputs, output):
        starts, w_hh = inputs[2], inputs[3]
        _, h_in, gh_n, rz, n = output
        ctx.mark_non_differentiable(h_in, gh_n, rz, n)
        ctx.save_for_backward(starts, w_hh, h_in, gh_n, rz, n)
        ctx.grad_dtype = inputs[5] if len(inputs) > 5 else None

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *_):
        starts, w_hh, h_in, gh_n, rz, n = ctx.saved_tensors
        steps, batch, size = n.shape
        r, z = rz.split(size, -1)
        # h_t = n + z (h_in - n): per step, dh (the gradient reaching h_t) times one
        # coefficient per target gives, at once, the gradients of W_hh h_in + b_hh's r, z and
        # n gates and the direct path to h_in; all coefficients are computed for all steps here.
        coef = n.new_empty(steps, batch, 4, size)
        da_n = torch.mul(1 - z, 1 - n * n)  # dh -> n's pre-activation
        torch.mul(da_n * r, gh_n * (1 - r), out=coef[:, :, 0])
        torch.mul((h_in - n) * z, 1 - z, out=coef[:, :, 1])
        torch.mul(da_n, r, out=coef[:, :, 2])
        coef[:, :, 3] = z
        grad_out = grad_out.transpose(0, 1)
        reset = starts.transpose(0, 1).unsqueeze(-1).to(grad_out.dtype)
        # The gradient reaching h_in at t+1 flows on to h_t unless the state was reset there.
        keep_next = torch.cat([1 - reset[1:], reset.new_zeros(1, batch, 1)])
        products = grad_out.new_empty(steps, batch, 4, size)  # dh * coef, per step
        dh = grad_out.new_empty(steps, batch, size)
        # carries[t]: the gradient reaching h_in at t (from h_t's gates and the direct path).
        carries = grad_out.new_empty(steps, batch, size)
        d_gh, direct = products.view(steps, batch, 4 * size).split([3 * size, size], -1)
        per_step = (grad_out, dh, dh.unsqueeze(-2), coef, products, d_gh, direct, carries)
        per_step = [v.unbind(0)[::-1] for v in per_step]
        # Only steps followed by a reset (and the last) stop the carry; elsewhere it is added.
        stops = [*_reset_steps(reset[1:]), True]
        carry = torch.zeros_like(grad_out[0])  # the gradient reaching h_in at t+1
        for t, (grad_t, dh_t, dh_row_t, coef_t, products_t, d_gh_t, direct_t, carry_t) in zip(
            range(steps - 1, -1, -1), zip(*per_step)
        ):
            if stops[t]:
                torch.addcmul(grad_t, carry, keep_next[t], out=dh_t)
            else:
                torch.add(grad_t, carry, out=dh_t)
            torch.mul(dh_row_t, coef_t, out=products_t)
            carry = torch.addmm(direct_t, d_gh_t, w_hh, out=carry_t)
        flat, h_flat = d_gh.reshape(-1, 3 * size), h_in.reshape(-1, size)
        if ctx.grad_dtype is None:
            d_w = flat.t() @ h_flat
        else:
            d_w = (flat.t().to(ctx.grad_dtype) @ h_flat.to(ctx.grad_dtype)).to(w_hh.dtype)
        d_b = flat.sum(0)
        torch.mul(dh, da_n, out=products[:, :, 2])  # d_gh becomes the input gates' gradient
        # Where the state was reset, what reached h_in goes to the stored state instead.
        d_stored = (carries * reset).transpose(0, 1) if ctx.needs_input_grad[1] else None
        return d_gh.transpose(0, 1), d_stored, None, d_w, d_b, None

    @staticmethod
    def vmap(info, in_dims, gi, stored, starts, w_hh, b_hh, grad_dtype=None):
        """Batching rule: the scan writes into preallocated buffers (``out=``), which vmap
        cannot trace. With shared weights (vmap over data) the vmapped dim joins the batch of
        one scan; with per-map weights (stacked parameter sets) each set runs its own scan."""
        args = (gi, stored, starts, w_hh, b_hh)
        size = info.batch_size

        def leading(value, dim):
            return value.expand(size, *value.shape) if dim is None else value.movedim(dim, 0)

        gi, stored, starts = (leading(v, d) for v, d in zip(args[:3], in_dims[:3]))
        if in_dims[3] is None and in_dims[4] is None:
            batch = gi.shape[1]
            outs = _GRUScan.apply(
                gi.flatten(0, 1),
                stored.flatten(0, 1),
                starts.flatten(0, 1),
                w_hh,
                b_hh,
                grad_dtype,
            )
            # out is [size * S, L, h]; the intermediates are time-major [L, size * S, ...].
            out = outs[0].unflatten(0, (size, batch))
            rest = [v.unflatten(1, (size, batch)) for v in outs[1:]]
            return (out, *rest), (0, 1, 1, 1, 1)
        w_hh, b_hh = (leading(v, d) for v, d in zip(args[3:], in_dims[3:]))
        per_map = [
            _GRUScan.apply(*map_args, grad_dtype)
            for map_args in zip(gi, stored, starts, w_hh, b_hh)
        ]
        return tuple(torch.stack(outs) for outs in zip(*per_map)), (0,) * 5
