"""The Mixture-of-Pathways math (SPEC section 2), on plain tensors.

Layout used throughout: ``x`` is ``[S, L, F]`` (``S`` independent sequences of ``L`` steps) and
every recurrent state is ``[S, h]``. Step mode is ``L == 1``. The TorchRL wrapper
(:mod:`mop_torchrl.core.module`) maps TensorDicts onto this layout.

Two implementations share the same parameters:

* ``"reference"``: one ``nn.GRU`` per router/expert and one output projection per expert, the
  way the BabyAI integration did it; kept as the oracle for tests and benchmarks.
* ``"fused"`` (GRU kernels in :mod:`mop_torchrl.core.fused`): over sequences, the input gates of a
  block's GRUs are one product over all steps and only the recurrent products run per step
  (resets without padding); the weighted expert projections accumulate in place
  (:meth:`MoPBlock.fused_mix`).

Under ``torch.vmap`` (or any torch.func transform) the reference runs its GRUs as a Python loop
of cells (``aten::gru`` has no batching rule), and its recurrent mode resets with a
``where`` on the state instead of padded segments (whose shapes depend on the data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mop_torchrl.core.config import MoPConfig
from mop_torchrl.core.fused import functorch_active, gru_cell, gru_recurrence

__all__ = ["CoreOutput", "Expert", "MoPBlock", "MoPCore", "routing_cost_loss"]

Implementation = Literal["fused", "reference"]


class Expert(nn.Module):
    """A recurrent expert: ``E = Linear(ReLU(Norm(GRU(x, h))))``."""

    def __init__(self, input_dim: int, hidden_dim: int, norm: str) -> None:
        super().__init__()
        self.gru = nn.GRU(input_dim, hidden_dim, batch_first=True)
        self.norm = nn.LayerNorm(hidden_dim) if norm == "layer" else nn.Identity()
        self.proj = nn.Linear(hidden_dim, input_dim)

    def output(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(F.relu(self.norm(h)))


@dataclass
class BlockOutput:
    y: torch.Tensor
    """Block output ``[S, L, D]``."""
    weights: torch.Tensor
    """Mixing weights after expert dropout ``[S, L, k]``."""
    cost: torch.Tensor
    """This block's routing cost ``Σ_i p_i d_i^c`` (pre-dropout ``p``; divided by the largest
    ``d_i^c`` with ``cost_norm="block_max"``) ``[S, L]``."""
    states: list[torch.Tensor]
    """Hidden state after every step, router first then non-identity experts, ``[S, L, h]``."""


class MoPBlock(nn.Module):
    """One block: a GRU router mixing heterogeneous experts over a residual + LayerNorm.

    Args:
        config: the core's configuration.
        sizes: hidden size of each expert (``0`` is the identity expert, which has no state).
    """

    def __init__(self, config: MoPConfig, sizes: list[int]) -> None:
        super().__init__()
        dim = config.intermediate_dim
        self.sizes = tuple(sizes)
        self.router = nn.GRU(dim, config.router_dim, batch_first=True)
        self.router_head = nn.Linear(config.router_dim, len(sizes))
        # Identity experts hold an nn.Identity so that expert indices match the spec.
        self.experts = nn.ModuleList(
            Expert(dim, size, config.expert_norm) if size > 0 else nn.Identity() for size in sizes
        )
        self.norm = nn.LayerNorm(dim)
        self.dropout_beta = config.dropout_beta
        self.dropout_gamma = config.dropout_gamma
        # Structure-derived constants, as buffers so they follow the module's device.
        stateful = [i for i, size in enumerate(sizes) if size > 0]
        largest = max(range(len(sizes)), key=sizes.__getitem__)
        cost = torch.tensor([float(size) ** config.cost_exponent for size in sizes])
        if config.cost_norm == "block_max" and cost.max() > 0:
            cost = cost / cost.max()
        constants = {
            "expert_cost": cost,
            "largest_mask": torch.arange(len(sizes)) == largest,
            "identity_mask": torch.tensor([float(size == 0) for size in sizes]),
            "stateful_index": torch.tensor(stateful, dtype=torch.long),
        }
        for name, value in constants.items():
            self.register_buffer(name, value, persistent=False)
        # Inference knobs for ablations (see MoPModule.set_inference_knobs).
        self.weight_threshold = 0.0
        self.disable_largest = False

    @property
    def stateful_experts(self) -> list[int]:
        """Indices of the experts that have a recurrent state (size > 0)."""
        return [i for i, size in enumerate(self.sizes) if size > 0]

    @property
    def grus(self) -> list[nn.GRU]:
        """The block's GRUs in state order: router, then each non-identity expert."""
        return [self.router] + [self.experts[i].gru for i in self.stateful_experts]

    @property
    def state_sizes(self) -> list[int]:
        """Hidden sizes in state order: router, then each non-identity expert."""
        return [self.router.hidden_size] + [self.sizes[i] for i in self.stateful_experts]

    def gates(self, router_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing probabilities ``p`` (for the cost) and mixing weights ``p'`` (after dropout)."""
        logits = self.router_head(F.relu(router_states))
        if self.disable_largest:
            logits = logits.masked_fill(self.largest_mask, -torch.inf)
        probs = torch.softmax(logits, dim=-1)
        if self.weight_threshold > 0:
            keep = (probs >= self.weight_threshold) | _argmax_mask(probs)
            probs = probs * keep
            probs = probs / probs.sum(-1, keepdim=True)
        weights = probs
        if self.training and self.dropout_beta > 0:
            # Drop expert i with probability β(1 − p_i/γ) when p_i < γ; never the argmax.
            drop_prob = self.dropout_beta * (1 - probs / self.dropout_gamma).clamp(min=0)
            dropped = (torch.rand_like(probs) < drop_prob) & ~_argmax_mask(probs)
            weights = torch.softmax(logits.masked_fill(dropped, -torch.inf), dim=-1)
            if self.weight_threshold > 0:
                weights = weights * keep
                weights = weights / weights.sum(-1, keepdim=True)
        return probs, weights

    def mix(
        self, x: torch.Tensor, expert_states: list[torch.Tensor], weights: torch.Tensor
    ) -> torch.Tensor:
        """``LayerNorm(x + Σ_i w_i E_i)`` with one output projection per expert (reference)."""
        states = iter(expert_states)
        total = x
        for i, expert in enumerate(self.experts):
            out = x if self.sizes[i] == 0 else expert.output(next(states))
            total = total + weights[..., i : i + 1] * out
        return self.norm(total)

    def fused_mix(
        self, x: torch.Tensor, expert_states: list[torch.Tensor], weights: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`mix` with the weighted projections accumulated by ``addmm``:
        ``Σ_i w_i (W_i a_i + b_i) = Σ_i W_i (w_i a_i) + w B``."""
        shape = x.shape
        x, weights = x.reshape(-1, shape[-1]), weights.reshape(-1, weights.shape[-1])
        experts = [self.experts[i] for i in self.stateful_experts]
        total, stateful_weights = x, weights
        if len(experts) < len(self.sizes):  # identity experts add (Σ w_id) x
            total = torch.addcmul(x, x, weights @ self.identity_mask.unsqueeze(-1))
            stateful_weights = weights.index_select(-1, self.stateful_index)
        if experts:
            biases = torch.stack([expert.proj.bias for expert in experts])
            total = torch.addmm(total, stateful_weights, biases)
            for i, expert, h in zip(self.stateful_experts, experts, expert_states):
                act = F.relu(expert.norm(h.reshape(-1, h.shape[-1]))) * weights[:, i : i + 1]
                total = torch.addmm(total, act, expert.proj.weight.t())
        return self.norm(total).reshape(shape)

    def forward(
        self,
        x: torch.Tensor,
        states: list[torch.Tensor],
        implementation: Implementation,
        starts: torch.Tensor | None = None,
    ) -> BlockOutput:
        """See :meth:`MoPCore.forward`; the reference gets ``starts`` only under torch.func
        transforms (otherwise the core splits the rows into segments for it)."""
        if implementation == "fused":
            new_states = gru_recurrence(self.grus, x, states, starts)
        elif starts is None and not functorch_active():
            new_states = [gru(x, h.unsqueeze(0))[0] for gru, h in zip(self.grus, states)]
        else:
            new_states = [_gru_loop(gru, x, h, starts) for gru, h in zip(self.grus, states)]
        probs, weights = self.gates(new_states[0])
        if implementation == "fused":
            y = self.fused_mix(x, new_states[1:], weights)
        else:
            y = self.mix(x, new_states[1:], weights)
        cost = (probs * self.expert_cost).sum(-1)
        return BlockOutput(y=y, weights=weights, cost=cost, states=new_states)


def _argmax_mask(probs: torch.Tensor) -> torch.Tensor:
    return F.one_hot(probs.argmax(-1), probs.shape[-1]).bool()


def _gru_loop(
    gru: nn.GRU, x: torch.Tensor, h: torch.Tensor, starts: torch.Tensor | None
) -> torch.Tensor:
    """``gru`` one cell at a time over ``x [S, L, D]`` (the form vmap can batch).

    ``h`` is ``[S, h]``, or with ``starts [S, L]`` the stored states ``[S, L, h]`` restarted
    from wherever ``starts`` is true. Returns the state after every step ``[S, L, h]``.
    """
    weights = (gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)
    state = h if starts is None else h[:, 0]  # starts is true at t=0
    out = []
    for t in range(x.shape[1]):
        if starts is not None and t > 0:
            state = torch.where(starts[:, t, None], h[:, t], state)
        state = gru_cell(x[:, t], state, *weights)
        out.append(state)
    return torch.stack(out, 1)


@dataclass
class CoreOutput:
    features: torch.Tensor
    """Output of the last block ``[S, L, D]``."""
    weights: list[torch.Tensor]
    """Per block mixing weights (post-dropout) ``[S, L, k_l]``."""
    cost: torch.Tensor
    """Routing cost summed over blocks ``[S, L]``."""
    states: list[list[torch.Tensor]]
    """Per block, per state (router first) hidden state after every step ``[S, L, h]``."""


class MoPCore(nn.Module):
    """Input projection followed by the MoP blocks.

    Examples:
        >>> import torch
        >>> core = MoPCore(MoPConfig(input_dim=8, layers="0,4,8", intermediate_dim=16, router_dim=4))
        >>> states = [[torch.zeros(2, h) for h in core.blocks[0].state_sizes]]
        >>> out = core(torch.randn(2, 5, 8), states)
        >>> out.features.shape, out.weights[0].shape, out.cost.shape
        (torch.Size([2, 5, 16]), torch.Size([2, 5, 3]), torch.Size([2, 5]))
    """

    def __init__(self, config: MoPConfig, implementation: Implementation = "fused") -> None:
        super().__init__()
        if implementation not in ("fused", "reference"):
            raise ValueError(
                f"implementation must be 'fused' or 'reference', got {implementation!r}"
            )
        self.config = config
        self.implementation = implementation
        self.input_proj = nn.Linear(config.input_dim, config.intermediate_dim)
        self.blocks = nn.ModuleList(MoPBlock(config, sizes) for sizes in config.layers)

    def forward(
        self,
        x: torch.Tensor,
        states: list[list[torch.Tensor]],
        starts: torch.Tensor | None = None,
    ) -> CoreOutput:
        """Runs ``x [S, L, input_dim]`` through the blocks.

        Without ``starts``, ``states`` are per block, per state (router first) the initial
        states ``[S, h]``. With ``starts [S, L]`` (bool, true at ``t=0``), ``states`` are
        ``[S, L, h]`` and each sequence restarts from ``states[:, t]`` wherever
        ``starts[:, t]`` (the recurrent mode's resets). The fused path runs these resets in
        place; the reference splits the rows into padded segments (under torch.func
        transforms, where shapes may not depend on the data, it resets in a loop of cells).
        """
        if starts is not None and self.implementation == "reference" and not functorch_active():
            segments = _Segments(starts)
            out = self.forward(
                segments.pack(x), [[segments.initial(s) for s in block] for block in states]
            )
            return CoreOutput(
                features=segments.unpack(out.features),
                weights=[segments.unpack(w) for w in out.weights],
                cost=segments.unpack(out.cost),
                states=[[segments.unpack(s) for s in block] for block in out.states],
            )
        h = self.input_proj(x)
        weights, costs, new_states = [], [], []
        for block, block_states in zip(self.blocks, states):
            out = block(h, block_states, self.implementation, starts)
            h = out.y
            weights.append(out.weights)
            costs.append(out.cost)
            new_states.append(out.states)
        return CoreOutput(features=h, weights=weights, cost=sum(costs), states=new_states)


class _Segments:
    """Splits ``[N, T]`` rows at segment starts into a padded ``[S, L]`` layout and back."""

    def __init__(self, starts: torch.Tensor) -> None:
        n, steps = starts.shape
        self.shape = (n, steps)
        flat_starts = starts.reshape(-1)
        self.segment = flat_starts.long().cumsum(0) - 1  # segment id of each (n, t)
        start_index = torch.nonzero(flat_starts).squeeze(-1)  # flat index of each start
        self.num_segments = start_index.numel()
        self.position = torch.arange(n * steps, device=starts.device) - start_index[self.segment]
        lengths = torch.diff(start_index, append=start_index.new_tensor([n * steps]))
        self.length = int(lengths.max())
        self.start_index = start_index

    def pack(self, value: torch.Tensor) -> torch.Tensor:
        flat = value.reshape(-1, *value.shape[2:])
        out = flat.new_zeros(self.num_segments, self.length, *value.shape[2:])
        return out.index_put((self.segment, self.position), flat)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        return packed[self.segment, self.position].reshape(*self.shape, *packed.shape[2:])

    def initial(self, stored: torch.Tensor) -> torch.Tensor:
        """The stored state ``[N, T, h]`` at each segment's first step, ``[S, h]``."""
        return stored.reshape(-1, stored.shape[-1])[self.start_index]


def routing_cost_loss(
    task_loss: torch.Tensor,
    cost: torch.Tensor,
    alpha: float,
    epsilon: float = 1e-2,
    mode: Literal["scaled", "plain"] = "scaled",
) -> torch.Tensor:
    """Adds the routing cost to a task loss.

    ``scaled`` (the paper's): ``L + α·cost/(ε + L)``, the denominator not detached, so the cost
    weighs more once the task is learnt; ``plain``: ``L + α·cost``. ``cost`` is averaged.

    Examples:
        >>> import torch
        >>> routing_cost_loss(torch.tensor(1.0), torch.tensor([2.0, 4.0]), alpha=0.5, epsilon=1.0)
        tensor(1.7500)
        >>> routing_cost_loss(torch.tensor(1.0), torch.tensor([2.0, 4.0]), alpha=0.5, mode="plain")
        tensor(2.5000)
    """
    if alpha == 0:
        return task_loss
    mean_cost = cost.mean()
    if mode == "scaled":
        return task_loss + alpha * mean_cost / (epsilon + task_loss)
    if mode == "plain":
        return task_loss + alpha * mean_cost
    raise ValueError(f"mode must be 'scaled' or 'plain', got {mode!r}")
