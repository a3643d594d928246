"""The training objectives as TorchRL ``LossModule``s: imitation, and PPO with the routing cost.

Both return ``loss_*`` terms (the optimizer minimises their sum) and detached metrics, all as
tensors; the one value read back to Python is the scaled form's check that the cross-entropy
is positive and finite. The routing-cost settings (α, ε, the ``scaled``/``plain`` form, batch
or per-level scaling) belong to the objective, not to the architecture; the math is
:func:`~mop_torchrl.core.model.routing_cost_loss`'s and
:func:`~mop_torchrl.core.model.grouped_routing_cost_loss`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tensordict import NestedKey, TensorDict, TensorDictBase
from tensordict.nn import ProbabilisticTensorDictSequential, TensorDictModuleBase
from tensordict.utils import unravel_key
from torchrl.modules import set_recurrent_mode
from torchrl.objectives import ClipPPOLoss, LossModule

from mop_torchrl.core.config import DEFAULT_ALPHA, DEFAULT_RL_ALPHA
from mop_torchrl.core.model import grouped_routing_cost_loss, routing_cost_loss
from mop_torchrl.train.config import TrainConfig

__all__ = [
    "ImitationLoss",
    "RoutingClipPPOLoss",
    "imitation_loss",
    "learner_autocast",
    "routing_metrics",
    "total_loss",
]


def routing_metrics(
    td: TensorDictBase, routing: NestedKey = "routing", cost: NestedKey = ("routing", "cost")
) -> TensorDict:
    """Detached ``routing_cost`` (mean per step) and each block's mean weight per expert.

    ``td`` holds the policy's routing outputs: per block the weights ``[*B, k]`` under the
    ``routing`` root, and the per-step ``cost``. Expert weights land under
    ``("expert_weight", "block{l}")`` as ``[k]`` vectors.

    Examples:
        >>> import torch
        >>> td = TensorDict(routing=TensorDict(
        ...     cost=torch.tensor([1.0, 3.0]), block0=torch.tensor([[1.0, 0.0], [0.5, 0.5]]),
        ...     batch_size=[2]), batch_size=[2])
        >>> out = routing_metrics(td)
        >>> out["routing_cost"].item(), out["expert_weight", "block0"].tolist()
        (2.0, [0.75, 0.25])
    """
    root, cost = _as_tuple(routing), _as_tuple(cost)
    out = TensorDict(routing_cost=td.get(cost).detach().mean())
    for key, weights in td.get(root).items(include_nested=True, leaves_only=True):
        if root + _as_tuple(key) != cost:
            out["expert_weight", key] = weights.detach().reshape(-1, weights.shape[-1]).mean(0)
    return out


def _as_tuple(key: NestedKey) -> tuple[str, ...]:
    key = unravel_key(key)
    return key if isinstance(key, tuple) else (key,)


class ImitationLoss(LossModule):
    """Cross-entropy to an expert's actions over ``[B, T]`` sequences, plus MoP's routing cost.

    The policy is replayed in recurrent mode (``set_recurrent_mode(True)``) on the batch, from
    the hidden states stored at collection time, so gradients flow through time (truncated
    BPTT). Steps labelled ``-1`` (a bot failure, a burn-in step) count for nothing.

    Args:
        policy: the actor (its deterministic part, ``det_part``, is what runs: no sampling) or
            any module writing the logits, e.g. ``policy_parts(actor).logits``.

    Keyword Args:
        alpha (float): routing-cost weight α (``0``: the task loss alone). Default
            :data:`~mop_torchrl.core.config.DEFAULT_ALPHA` (``1e-2``).
        epsilon (float): ε of the scaled form ``α·cost/(ε + L)``. Default ``1e-2``.
        cost_mode (str): ``"scaled"`` (the paper's) or ``"plain"`` (``α·cost``).
        cost_scaling (str): ``"batch"``: one ``L`` and one mean cost for the whole batch
            (:func:`~mop_torchrl.core.model.routing_cost_loss`); ``"per_level"``: the paper's
            per-task form over the levels of a multi-level batch,
            ``Σ_k w_k·[L_k + α·cost_k/(ε + L_k)]`` with ``L_k``, ``cost_k`` the means over
            level ``k``'s labelled steps and ``w_k = n_k/N`` its share of the batch's labelled
            steps (:func:`~mop_torchrl.core.model.grouped_routing_cost_loss`). Those weights
            keep ``Σ_k w_k L_k`` equal to the batch cross-entropy, so per-level scaling changes
            the routing term only: each step's cost is pulled by ``α/(ε + L_k)`` of its own
            level. (The paper sums its tasks unweighted, ``w_k = 1``; with equally represented
            tasks that is ``K`` times these weights, a factor Adam all but ignores, but it would
            tie the loss's scale to the number of levels present and weigh a rare level's steps
            more.) Needs the ``level`` key. Default ``"batch"``.
        num_levels (int): ``per_level``: the number of levels (``level`` is in
            ``[0, num_levels)``).

    Returns (from ``forward``), a TensorDict of scalars unless noted:
        ``loss_imitation`` (the cross-entropy ``L``), ``loss_routing`` (MoP only: the routing
        term, so ``loss_imitation + loss_routing`` equals
        ``routing_cost_loss(L, cost, alpha, epsilon, cost_mode)``, or per level
        ``grouped_routing_cost_loss(...)``), and detached metrics:
        ``accuracy`` (greedy action = label, over labelled steps), ``label_fraction``,
        ``routing_cost`` and ``("expert_weight", "block{l}")`` ``[k]`` (MoP only); with
        ``per_level``, ``("level", "steps" | "loss_sum" | "routing_cost_sum")`` ``[num_levels]``,
        each level's labelled steps and the sums of their cross-entropy and routing cost (MoP),
        so that means over many batches (``sum / steps``) weigh every step alike.

    A non-finite cross-entropy is returned as it is (the training loop stops on it and keeps
    its last checkpoint); the scaled form reads ``L`` back to check it (one host read).

    Keys (:meth:`set_keys`): ``expert_action`` (the label), ``logits``, ``routing_cost``
    (``("routing", "cost")``), ``routing`` (the root of the routing outputs) and ``level``
    (``per_level``: each step's level index, int64 ``[B, T]``).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from mop_torchrl import MoPConfig
        >>> from mop_torchrl.babyai.policy import EncoderConfig, make_policy
        >>> actor, _ = make_policy(
        ...     "mop", mop=MoPConfig(layers="0,8;8,16", intermediate_dim=16, router_dim=8),
        ...     encoder=EncoderConfig(image_channels=8, instr_dim=16))
        >>> B, T = 2, 5
        >>> batch = TensorDict(
        ...     image=torch.randint(3, (B, T, 7, 7, 3), dtype=torch.uint8),
        ...     direction=torch.randint(4, (B, T)), carrying=torch.zeros(B, T, dtype=torch.long),
        ...     mission=torch.randint(1, 9, (B, T, 6)), is_init=torch.ones(B, T, 1, dtype=torch.bool),
        ...     expert_action=torch.tensor([[0, 1, 2, -1, 3], [4, 5, 6, 0, -1]]), batch_size=[B, T])
        >>> loss = ImitationLoss(actor, alpha=1e-2)
        >>> out = loss(batch)  # is_init everywhere: no stored states needed
        >>> sorted(k for k in out.keys() if k.startswith("loss_"))
        ['loss_imitation', 'loss_routing']
        >>> (out["loss_imitation"] + out["loss_routing"]).backward()
        >>> round(out["label_fraction"].item(), 3), out["expert_weight", "block0"].shape
        (0.8, torch.Size([2]))
    """

    @dataclass
    class _AcceptedKeys:
        """Tensordict keys the loss reads (change them with :meth:`set_keys`).

        Attributes:
            expert_action (NestedKey): the label, int64 ``[B, T]``; ``-1`` is ignored.
            logits (NestedKey): what the policy writes, ``[B, T, num_actions]``.
            routing_cost (NestedKey): the per-step routing cost the policy writes (MoP).
            routing (NestedKey): the root of the routing outputs (per-block expert weights).
            level (NestedKey): ``per_level``: each step's level index, int64 ``[B, T]``.
        """

        expert_action: NestedKey = "expert_action"
        logits: NestedKey = "logits"
        routing_cost: NestedKey = ("routing", "cost")
        routing: NestedKey = "routing"
        level: NestedKey = "level"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys

    def __init__(
        self,
        policy: TensorDictModuleBase,
        *,
        alpha: float = DEFAULT_ALPHA,
        epsilon: float = 1e-2,
        cost_mode: Literal["scaled", "plain"] = "scaled",
        cost_scaling: Literal["batch", "per_level"] = "batch",
        num_levels: int | None = None,
    ) -> None:
        if not 0 <= alpha < float("inf"):
            raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
        if not 0 < epsilon < float("inf"):
            raise ValueError(f"epsilon must be finite and > 0, got {epsilon!r}")
        if cost_mode not in ("scaled", "plain"):
            raise ValueError(f"cost_mode must be 'scaled' or 'plain', got {cost_mode!r}")
        if cost_scaling not in ("batch", "per_level"):
            raise ValueError(f"cost_scaling must be 'batch' or 'per_level', got {cost_scaling!r}")
        if cost_scaling == "per_level" and not (isinstance(num_levels, int) and num_levels > 0):
            raise ValueError(f"cost_scaling 'per_level' needs num_levels > 0, got {num_levels!r}")
        super().__init__()
        if isinstance(policy, ProbabilisticTensorDictSequential):
            policy = policy.det_part  # the logits; the loss never samples
        self.policy = policy
        self.alpha, self.epsilon, self.cost_mode = alpha, epsilon, cost_mode
        self.cost_scaling, self.num_levels = cost_scaling, num_levels

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass  # no value estimator

    @property
    def in_keys(self) -> list[NestedKey]:
        keys = [*self.policy.in_keys, self.tensor_keys.expert_action]
        return [*keys, self.tensor_keys.level] if self.cost_scaling == "per_level" else keys

    @property
    def out_keys(self) -> list[NestedKey]:
        return ["loss_imitation", "loss_routing", "accuracy", "label_fraction", "routing_cost"]

    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        keys = self.tensor_keys
        with set_recurrent_mode(True):  # LossModule enters it too; here for the reader
            out = self.policy(tensordict.copy())  # a shallow copy: the input stays as it was
        logits = out.get(keys.logits)
        labels = tensordict.get(keys.expert_action).reshape(logits.shape[:-1])
        valid = labels >= 0
        task = F.cross_entropy(logits[valid], labels[valid])
        hits = (logits.detach().argmax(-1) == labels) & valid
        result = TensorDict(
            loss_imitation=task,
            accuracy=hits.sum() / valid.sum(),
            label_fraction=valid.float().mean(),
        )
        cost = out.get(keys.routing_cost, None)
        groups = None
        if self.cost_scaling == "per_level":
            level = tensordict.get(keys.level).reshape(labels.shape)
            step_loss, result["level"] = self._per_level(logits, labels, valid, level, cost)
            steps = result["level", "steps"]
            groups = (level, step_loss, steps / steps.sum())  # w_k: shares of labelled steps
        if cost is not None:  # MoP; a GRU/LSTM core writes no routing outputs
            result["loss_routing"] = self._routing_term(valid, task, cost, groups)
            result.update(routing_metrics(out, keys.routing, keys.routing_cost))
        return result

    def _per_level(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor,
        level: torch.Tensor,
        cost: torch.Tensor | None,
    ) -> tuple[torch.Tensor, TensorDict]:
        """Each step's cross-entropy ``[B, T]``, and per level ``[K]`` (detached) its labelled
        steps and their summed cross-entropy and routing cost."""
        step_loss = F.cross_entropy(
            logits.flatten(0, -2), torch.where(valid, labels, 0).flatten(), reduction="none"
        ).reshape(labels.shape)
        weight = valid.to(logits.dtype)

        def per_level_sum(values: torch.Tensor) -> torch.Tensor:
            return logits.new_zeros(self.num_levels).index_add(
                0, level.flatten(), (values * weight).flatten()
            )

        with torch.no_grad():
            sums = TensorDict(
                steps=per_level_sum(torch.ones_like(weight)), loss_sum=per_level_sum(step_loss)
            )
            if cost is not None:
                sums["routing_cost_sum"] = per_level_sum(cost.reshape(labels.shape))
        return step_loss, sums

    def _routing_term(
        self,
        valid: torch.Tensor,
        task: torch.Tensor,
        cost: torch.Tensor,
        groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """``total - L``: what the routing cost adds to the cross-entropy ``task``; per level
        with ``groups`` (each step's level and cross-entropy, and the weights ``w_k``)."""
        if self.alpha == 0 or (self.cost_mode == "scaled" and not bool(torch.isfinite(task))):
            return task - task  # 0, or the non-finite L's own NaN for the loop to report
        if groups is None:
            total = routing_cost_loss(task, cost, self.alpha, self.epsilon, self.cost_mode)
            return total - task
        level, step_loss, weights = groups
        total = grouped_routing_cost_loss(
            step_loss,
            cost.reshape(valid.shape),
            level,
            valid,
            weights,
            self.alpha,
            self.epsilon,
            self.cost_mode,
        )
        return total - task


def learner_autocast(config: TrainConfig) -> torch.autocast:
    """The context of the learner's loss forward: bfloat16 autocast if ``config.autocast``
    says so (the products of the encoder and the core's input and output projections in
    bfloat16; the GRU recurrences, the cross-entropy and the weights in float32).

    Examples:
        >>> with learner_autocast(TrainConfig(autocast="bfloat16")):
        ...     torch.ones(2, 2) @ torch.ones(2, 2)
        tensor([[2., 2.],
                [2., 2.]], dtype=torch.bfloat16)
    """
    device = torch.device(config.device).type
    return torch.autocast(device, torch.bfloat16, enabled=config.autocast == "bfloat16")


def imitation_loss(actor: ProbabilisticTensorDictSequential, config: TrainConfig) -> ImitationLoss:
    """The run's :class:`ImitationLoss` for ``actor``: the config's α, ε, cost form and
    scaling, and its number of levels (one place for the DAgger and BC loops)."""
    return ImitationLoss(
        actor,
        alpha=config.alpha,
        epsilon=config.epsilon,
        cost_mode=config.cost_mode,
        cost_scaling=config.cost_scaling,
        num_levels=len(config.levels),
    )


class RoutingClipPPOLoss(ClipPPOLoss):
    """:class:`~torchrl.objectives.ClipPPOLoss` that also returns the routing cost of its own
    actor pass (``loss_routing = α·cost``, the plain form) and the routing metrics.

    Why plain: the scaled form ``α·cost/(ε + L)`` reads ``L`` as a positive measure of
    performance; PPO's total (surrogate + critic + entropy) is not one (≤ 0 in 5% of the
    minibatches of a short masked-CartPole run, where ``ε + L`` can change sign), and scaling by
    the critic loss instead ties the pressure to the reward scale and to how far the value
    targets have moved (the critic loss spanned 0.005–0.12 within 5k frames there: an 8x swing
    in the pressure). ``α`` defaults to
    :data:`~mop_torchrl.core.config.DEFAULT_RL_ALPHA`.

    ``ClipPPOLoss`` runs the actor on a shallow copy of its input (to get the distribution)
    and keeps only the log-probabilities; MoP's routing outputs, written by that same pass,
    were lost, and the cost needed a second actor pass. This keeps them from
    :meth:`_get_cur_log_prob`, the one place the current actor runs (the critic writes the
    routing keys again later, from its own pass: they are taken before).

    Args:
        actor, critic: as for ``ClipPPOLoss``.

    Keyword Args:
        alpha (float): routing-cost weight (``0``: the metrics only). Default
            :data:`~mop_torchrl.core.config.DEFAULT_RL_ALPHA`.
        routing (NestedKey): root of the routing outputs; its ``"cost"`` entry is the cost.
        **kwargs: ``ClipPPOLoss``'s (``clip_epsilon``, ``entropy_coeff``, ...).
    """

    def __init__(
        self,
        actor: ProbabilisticTensorDictSequential,
        critic: TensorDictModuleBase,
        *,
        alpha: float = DEFAULT_RL_ALPHA,
        routing: NestedKey = "routing",
        **kwargs,
    ) -> None:
        super().__init__(actor, critic, **kwargs)
        self.alpha = alpha
        self.routing_key = routing
        self._routing: TensorDictBase | None = None

    def _get_cur_log_prob(self, tensordict: TensorDictBase, params=None):
        result = super()._get_cur_log_prob(tensordict, params)
        if params is None:  # the current actor (a proximal/target pass passes its params)
            # A copy: the critic's pass writes the same keys into ``tensordict`` later.
            found = self.routing_key in tensordict.keys(include_nested=True)
            self._routing = tensordict.select(self.routing_key).copy() if found else None
        return result

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        losses = super().forward(tensordict)
        routing, self._routing = self._routing, None
        if routing is not None:
            cost_key = (*_as_tuple(self.routing_key), "cost")
            cost = routing.get(cost_key)
            losses["loss_routing"] = routing_cost_loss(
                cost.new_zeros(()), cost, self.alpha, mode="plain"
            )
            losses.update(routing_metrics(routing, self.routing_key, cost_key))
        return losses


def total_loss(losses: TensorDictBase) -> torch.Tensor:
    """The sum of a loss module's ``loss_*`` terms (what the optimizer minimises)."""
    return sum(value for key, value in losses.items() if key.startswith("loss_"))
