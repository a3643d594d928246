"""The Mixture-of-Pathways math (SPEC section 2), on plain tensors.

Layout used throughout: ``x`` is ``[S, L, F]`` (``S`` independent sequences of ``L`` steps) and
every recurrent state is ``[S, h]``. Step mode is ``L == 1``. The TorchRL wrapper
(:mod:`mop_torchrl.core.module`) maps TensorDicts onto this layout.

Three implementations share the same parameters (the state dict does not depend on them):

* ``"reference"``: one ``nn.GRU`` per router/expert and one output projection per expert, the
  way the BabyAI integration did it; kept as the oracle for tests and benchmarks.
* ``"fused"`` (GRU kernels in :mod:`mop_torchrl.core.fused`): over sequences, the input gates of a
  block's GRUs are one product over all steps and only the recurrent products run per step
  (resets without padding); the weighted expert projections accumulate in place
  (:meth:`MoPBlock.fused_mix`).
* ``"packed"`` (:mod:`mop_torchrl.core.packed`, for accelerators): a block's router and experts
  run as one GRU (one product for all input gates, one block-diagonal product for all hidden
  gates, one gate kernel), and the expert projections are one product on the weighted
  activations (:meth:`MoPBlock.packed_mix`); over sequences one scan per block.

``"auto"`` (the default) picks one by device and mode (:func:`resolve_implementation`, from
the measurements in :data:`AUTO_IMPLEMENTATION`).

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
from mop_torchrl.core.packed import packed_gru_recurrence

__all__ = [
    "CoreOutput",
    "Expert",
    "MoPBlock",
    "MoPCore",
    "grouped_routing_cost_loss",
    "routing_cost_loss",
]

Implementation = Literal["fused", "reference", "packed"]
"""A path that runs: see the module docstring."""
ImplementationChoice = Literal["auto", "fused", "reference", "packed"]
"""What a core is built with: a path, or ``"auto"`` (:func:`resolve_implementation`)."""
IMPLEMENTATIONS: tuple[Implementation, ...] = ("fused", "reference", "packed")

AUTO_IMPLEMENTATION: dict[str, dict[str, Implementation]] = {
    # 2-core Xeon, seed preset (docs/benchmarks.md): fused wins the step (1.67x vs 1.84x the
    # GRU's time at batch 64) and the sequence (178 vs 465 ms on [64, 32]). "packed" wins the
    # sequence only for tiny cores at small batch (per-op overhead; AMD EPYC, fwd+bwd [B, 32]):
    # paper preset with router 16 at B 8/16/64 0.59/0.71/0.96x fused, seed preset 1.27-1.50x.
    "cpu": {"step": "fused", "sequence": "fused"},
    # H200, torch 2.11 (docs/results/gpu/): eager step at batch 64/256/1024 fused 3.44/3.60/3.26
    # ms vs reference 3.70/3.82/3.91; sequence fwd+bwd on [256, 32]: reference (cuDNN) 20.9 ms
    # vs fused 96.5. "packed" is not measured on a GPU yet (benchmarks/gpu_issue22.sh).
    "cuda": {"step": "fused", "sequence": "reference"},
}
"""What ``"auto"`` runs, per device type (others: as on ``"cpu"``) and mode (``"step"``: one
step from ``[S, h]`` states; ``"sequence"``: anything longer, or with resets)."""


def resolve_implementation(
    choice: ImplementationChoice, device: torch.device | str, sequence: bool
) -> Implementation:
    """The path a core built with ``choice`` runs on ``device``, for one step or a sequence.

    ``"auto"`` reads :data:`AUTO_IMPLEMENTATION`, except under torch.func transforms
    (``vmap``), where it runs ``"fused"``: the reference's cuDNN GRUs have no batching rule
    (it loops over cells there), and the fused scan has its own.

    Examples:
        >>> resolve_implementation("auto", "cpu", sequence=True)
        'fused'
        >>> resolve_implementation("auto", "cuda", sequence=True)
        'reference'
        >>> resolve_implementation("packed", "cuda", sequence=False)
        'packed'
    """
    if choice != "auto":
        return choice
    if functorch_active():
        return "fused"
    device_type = torch.device(device).type
    table = AUTO_IMPLEMENTATION.get(device_type, AUTO_IMPLEMENTATION["cpu"])
    return table["sequence" if sequence else "step"]


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
            # The expert each column of the concatenated expert states belongs to (packed mix).
            "segment_expert": torch.tensor(
                [i for i in stateful for _ in range(sizes[i])], dtype=torch.long
            ),
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

    def _identity_part(
        self, x: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x + (Σ w_identity) x`` (just ``x`` without identity experts) and the stateful
        experts' weights: what both flat mixes start from (``x``, ``weights`` ``[N, ...]``)."""
        if len(self.stateful_experts) == len(self.sizes):
            return x, weights
        total = torch.addcmul(x, x, weights @ self.identity_mask.unsqueeze(-1))
        return total, weights.index_select(-1, self.stateful_index)

    def fused_mix(
        self, x: torch.Tensor, expert_states: list[torch.Tensor], weights: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`mix` with the weighted projections accumulated by ``addmm``:
        ``Σ_i w_i (W_i a_i + b_i) = Σ_i W_i (w_i a_i) + w B``."""
        shape = x.shape
        x, weights = x.reshape(-1, shape[-1]), weights.reshape(-1, weights.shape[-1])
        experts = [self.experts[i] for i in self.stateful_experts]
        total, stateful_weights = self._identity_part(x, weights)
        if experts:
            biases = torch.stack([expert.proj.bias for expert in experts])
            total = torch.addmm(total, stateful_weights, biases)
            for i, expert, h in zip(self.stateful_experts, experts, expert_states):
                act = F.relu(expert.norm(h.reshape(-1, h.shape[-1]))) * weights[:, i : i + 1]
                total = torch.addmm(total, act, expert.proj.weight.t())
        return self.norm(total).reshape(shape)

    def packed_mix(
        self, x: torch.Tensor, expert_states: list[torch.Tensor], weights: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`mix` with all expert projections as one product: ``Σ_i W_i (w_i a_i) =
        [W_1 .. W_m] · [w_1 a_1, .., w_m a_m]``, the activations ``a_i = ReLU(Norm(h_i))``
        weighted per column by the expert they come from."""
        shape = x.shape
        x, weights = x.reshape(-1, shape[-1]), weights.reshape(-1, weights.shape[-1])
        experts = [self.experts[i] for i in self.stateful_experts]
        total, stateful_weights = self._identity_part(x, weights)
        if experts:
            normed = [e.norm(h.reshape(-1, h.shape[-1])) for e, h in zip(experts, expert_states)]
            act = F.relu(torch.cat(normed, -1)) * weights.index_select(-1, self.segment_expert)
            biases = torch.stack([expert.proj.bias for expert in experts])
            total = torch.addmm(total, stateful_weights, biases)
            proj = torch.cat([expert.proj.weight for expert in experts], 1)  # [D, Σ d_i]
            total = torch.addmm(total, act, proj.t())
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
        elif implementation == "packed":
            new_states = packed_gru_recurrence(self.grus, x, states, starts)
        elif starts is None and not functorch_active():
            new_states = [gru(x, h.unsqueeze(0))[0] for gru, h in zip(self.grus, states)]
        else:
            new_states = [_gru_loop(gru, x, h, starts) for gru, h in zip(self.grus, states)]
        probs, weights = self.gates(new_states[0])
        if implementation == "fused":
            y = self.fused_mix(x, new_states[1:], weights)
        elif implementation == "packed":
            y = self.packed_mix(x, new_states[1:], weights)
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

    def __init__(self, config: MoPConfig, implementation: ImplementationChoice = "auto") -> None:
        super().__init__()
        if implementation not in ("auto", *IMPLEMENTATIONS):
            raise ValueError(
                "implementation must be 'auto', 'fused', 'reference' or 'packed', "
                f"got {implementation!r}"
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
        ``starts[:, t]`` (the recurrent mode's resets). The fused and packed paths run these
        resets in place; the reference splits the rows into padded segments (under torch.func
        transforms, where shapes may not depend on the data, it resets in a loop of cells).
        Which path runs: :meth:`resolve` (the core's ``implementation``, ``x``'s device, and
        whether this is one step from ``[S, h]`` states or a sequence).
        """
        sequence = starts is not None or x.shape[1] > 1
        return self._run(x, states, starts, self.resolve(x.device, sequence))

    def resolve(self, device: torch.device | str, sequence: bool) -> Implementation:
        """The path this core runs on ``device`` for a step or a sequence
        (:func:`resolve_implementation` of its ``implementation``)."""
        return resolve_implementation(self.implementation, device, sequence)

    def _run(
        self,
        x: torch.Tensor,
        states: list[list[torch.Tensor]],
        starts: torch.Tensor | None,
        implementation: Implementation,
    ) -> CoreOutput:
        if starts is not None and implementation == "reference" and not functorch_active():
            segments = _Segments(starts)
            out = self._run(
                segments.pack(x),
                [[segments.initial(s) for s in block] for block in states],
                None,
                implementation,
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
            out = block(h, block_states, implementation, starts)
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

    The scaled form reads ``L`` as a measure of performance: it must be non-negative and finite
    (a cross-entropy, which can round to exactly 0 once every label is predicted with a large
    margin: then the term is ``α·cost/ε``, finite). An RL objective is not one (PPO's surrogate
    and entropy terms go negative, and a total near ``-ε`` would blow the term up), so with
    ``α > 0`` a negative or non-finite ``L`` is refused (a ``ValueError`` naming it; this reads
    ``L`` back to the host).
    For an RL loss use ``plain`` (see ``DEFAULT_RL_ALPHA`` in :mod:`mop_torchrl.core.config`).
    For several tasks in a batch, each with its own ``L``, see
    :func:`grouped_routing_cost_loss`.

    Examples:
        >>> import torch
        >>> routing_cost_loss(torch.tensor(1.0), torch.tensor([2.0, 4.0]), alpha=0.5, epsilon=1.0)
        tensor(1.7500)
        >>> routing_cost_loss(torch.tensor(1.0), torch.tensor([2.0, 4.0]), alpha=0.5, mode="plain")
        tensor(2.5000)
        >>> routing_cost_loss(torch.tensor(-0.2), torch.tensor([2.0]), alpha=0.5)
        Traceback (most recent call last):
        ...
        ValueError: the scaled routing cost divides by the task loss, which must be non-negative and finite (a cross-entropy), got -0.2: use mode='plain' for an RL loss
    """
    if mode not in ("scaled", "plain"):
        raise ValueError(f"mode must be 'scaled' or 'plain', got {mode!r}")
    if alpha == 0:
        return task_loss
    mean_cost = cost.mean()
    if mode == "plain":
        return task_loss + alpha * mean_cost
    _check_task_loss(task_loss.detach().reshape(1))
    return task_loss + alpha * mean_cost / (epsilon + task_loss)


def grouped_routing_cost_loss(
    step_loss: torch.Tensor,
    cost: torch.Tensor,
    group: torch.Tensor,
    valid: torch.Tensor,
    weights: torch.Tensor,
    alpha: float,
    epsilon: float = 1e-2,
    mode: Literal["scaled", "plain"] = "scaled",
) -> torch.Tensor:
    """The routing cost per group (task, level) of a batch: ``Σ_k w_k·[L_k + α·cost_k/(ε + L_k)]``.

    The paper's code (``jackcook/mixture-of-pathways``) computes, for each task ``k`` present in
    a batch, the task's own loss ``L_k`` and mean routing cost ``cost_k`` over its samples and
    adds ``L_k + α·cost_k/(ε + L_k)`` (denominator not detached): a task already solved (small
    ``L_k``) feels a strong pull towards cheap experts, a task still failing a weak one. One
    ``L`` for a mixed batch (:func:`routing_cost_loss`) gives every task the same pull.

    ``L_k`` and ``cost_k`` are means over group ``k``'s valid steps. A group with no valid step
    in the batch contributes nothing (no NaN), and each group's term depends only on its own
    steps, so a router's gradient from a step comes through that step's group alone. ``plain``
    adds ``α·cost_k`` instead. ``weights`` are the ``w_k``: the paper sums the tasks unweighted
    (all ones); the share of each group's valid steps in the batch (``n_k / N``) makes
    ``Σ_k w_k L_k`` the batch's mean loss, so only the routing term changes (what
    :class:`~mop_torchrl.train.losses.ImitationLoss` uses). As in :func:`routing_cost_loss`,
    the scaled form refuses (``ValueError``) a present group's ``L_k`` that is negative or not
    finite when ``α > 0``.

    Args:
        step_loss: the task loss of every step ``[*S]`` (e.g. a cross-entropy with
            ``reduction="none"``); its value at invalid steps is ignored.
        cost: the routing cost of every step ``[*S]``.
        group: each step's group index, int64 ``[*S]`` in ``[0, K)``.
        valid: bool ``[*S]``, the steps that count (labelled, not burn-in).
        weights: ``w_k``, ``[K]``.
        alpha, epsilon, mode: as for :func:`routing_cost_loss`.

    Examples:
        >>> import torch
        >>> step_loss = torch.tensor([1.0, 3.0, 0.5, 9.0])
        >>> cost = torch.tensor([2.0, 2.0, 4.0, 7.0])
        >>> group = torch.tensor([0, 0, 1, 1])
        >>> valid = torch.tensor([True, True, True, False])  # the 9.0 step does not count
        >>> # group 0: L=2, cost=2 -> 2 + 0.5*2/(1+2); group 1: L=0.5, cost=4 -> 0.5 + 0.5*4/(1+0.5)
        >>> grouped_routing_cost_loss(step_loss, cost, group, valid, torch.ones(2), 0.5, 1.0)
        tensor(4.1667)
        >>> shares = torch.tensor([2 / 3, 1 / 3])  # each group's share of the valid steps
        >>> grouped_routing_cost_loss(step_loss, cost, group, valid, shares, 0.0)  # the mean loss
        tensor(1.5000)
        >>> grouped_routing_cost_loss(step_loss, cost, torch.zeros(4, dtype=torch.long), valid,
        ...                           torch.ones(3), 0.5, 1.0)  # groups 1 and 2 absent
        tensor(2.0333)
    """
    if mode not in ("scaled", "plain"):
        raise ValueError(f"mode must be 'scaled' or 'plain', got {mode!r}")
    num_groups = weights.shape[0]
    group, valid = group.reshape(-1), valid.reshape(-1)
    zero = step_loss.new_zeros(())
    # where, not a product: a NaN or inf at an invalid step stays out of the sums and gradients
    losses = torch.where(valid, step_loss.reshape(-1), zero)
    costs = torch.where(valid, cost.reshape(-1), zero)
    counts = step_loss.new_zeros(num_groups).index_add(0, group, valid.to(step_loss.dtype))
    present = counts > 0
    steps = counts.clamp(min=1)
    group_loss = step_loss.new_zeros(num_groups).index_add(0, group, losses) / steps
    group_cost = step_loss.new_zeros(num_groups).index_add(0, group, costs) / steps
    if alpha == 0:
        term = group_loss
    elif mode == "plain":
        term = group_loss + alpha * group_cost
    else:
        _check_task_loss(group_loss.detach(), present)
        term = group_loss + alpha * group_cost / (epsilon + group_loss)
    return torch.where(present, weights * term, zero).sum()


def _check_task_loss(task_loss: torch.Tensor, present: torch.Tensor | None = None) -> None:
    """Raises unless every (present) entry of ``task_loss`` is non-negative and finite (one
    host read)."""
    bad = ~((task_loss >= 0) & torch.isfinite(task_loss))
    if present is not None:
        bad = bad & present
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        which = "" if present is None else f" of group {index}"
        raise ValueError(
            f"the scaled routing cost divides by the task loss{which}, which must be "
            f"non-negative and finite (a cross-entropy), got {task_loss[index].item():g}: use "
            "mode='plain' for an RL loss"
        )
