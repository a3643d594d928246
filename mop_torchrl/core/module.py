"""``MoPModule``: the MoP core as a TorchRL recurrent module (SPEC section 3).

It follows :class:`torchrl.modules.GRUModule`'s contract: hidden states are read from the input
TensorDict and the new ones written to ``("next", key)``; ``is_init`` resets them; in recurrent
mode (``torchrl.modules.set_recurrent_mode(True)``) the last batch dim is time and every
``is_init`` step restarts from the state stored at that step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict import NestedKey, TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase, dispatch
from torchrl.data import Composite, Unbounded
from torchrl.envs import TensorDictPrimer
from torchrl.modules import canonicalize_rnn_subset, recurrent_mode

from mop_torchrl.core.config import MoPConfig
from mop_torchrl.core.model import ImplementationChoice, MoPCore

__all__ = ["MoPModule"]


class MoPModule(TensorDictModuleBase):
    """A Mixture-of-Pathways recurrent core for TorchRL pipelines.

    Args:
        config: the core's hyper-parameters (:class:`~mop_torchrl.MoPConfig`).

    Keyword Args:
        in_key: input features, ``[*batch, config.input_dim]``, of order 1 (like a
            normalised encoder's output): the core does not normalise them, and with
            features of standard deviation 16 about 5% of the first block's GRU update gates
            saturate at exactly 1.0 in float32, leaving those units at 0 from a zero state.
        out_key: output features, ``[*batch, config.intermediate_dim]``.
        state_key: root of the nested hidden-state keys
            ``(state_key, "block{l}", "router")`` and ``(state_key, "block{l}", "expert{i}")``
            (none for identity experts), each ``[*batch, 1, h]`` like ``GRUModule``'s.
        routing_key: root of the routing outputs: ``(routing_key, "block{l}")`` holds the
            block's mixing weights after expert dropout ``[*batch, k_l]``, and
            ``(routing_key, "cost")`` the step's routing cost ``Σ_l Σ_i p_{l,i} d_{l,i}^c``
            ``[*batch]``.
        implementation: ``"auto"`` (default: chosen by device and mode, see
            :func:`~mop_torchrl.core.model.resolve_implementation`; the fused path on CPU),
            ``"fused"`` (CPU-tuned GRU kernels), ``"packed"`` (each block's GRUs as one, for
            accelerators) or ``"reference"`` (one ``nn.GRU`` per expert). All compute the same
            function on the same parameters.
        default_recurrent_mode: the mode used outside any
            :class:`~torchrl.modules.set_recurrent_mode` context (``None``: step mode), as
            ``GRUModule``'s; read the mode in effect from :attr:`recurrent_mode`.

    In step mode (the default, what collectors call) the input is ``[*batch]`` and the state
    used is ``where(is_init, 0, stored)``. In recurrent mode the input is ``[*B, T]``; the
    sequence starts from the stored state at ``t=0`` and restarts from the stored state at every
    ``is_init`` step; ``("next", key)`` holds the final state of each segment at its last step
    and zeros elsewhere.

    Like ``GRUModule``, it can be called with keyword tensors named after its keys (nested
    keys joined by ``"_"``; it returns the ``out_keys`` values in order), runs under
    ``torch.vmap`` in both modes (with ``randomness="different"`` in train mode, where expert
    dropout draws random numbers), and :func:`torchrl.modules.canonicalize_rnn_subset`
    accepts it (:attr:`canonical_keys`, :meth:`canonicalize`).

    Hidden states may only be missing from the input where every sequence starts fresh
    (``is_init`` all true in step mode, at ``t=0`` in recurrent mode): anywhere else a missing
    state means no primer was registered with the environment, and TorchRL would otherwise
    silently restart the recurrence from zeros at every step.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.modules import set_recurrent_mode
        >>> cfg = MoPConfig(input_dim=8, layers="0,16;16,32", intermediate_dim=32, router_dim=8)
        >>> module = MoPModule(cfg, in_key="obs", out_key="features").eval()
        >>> td = TensorDict({"obs": torch.randn(4, 8), "is_init": torch.ones(4, 1, dtype=torch.bool)}, [4])
        >>> td = module(td)
        >>> td["features"].shape, td["next", "recurrent_state", "block1", "expert1"].shape
        (torch.Size([4, 32]), torch.Size([4, 1, 32]))
        >>> bool(torch.allclose(td["routing", "block0"].sum(-1), torch.ones(4)))
        True
        >>> seq = TensorDict({"obs": torch.randn(2, 5, 8), "is_init": torch.zeros(2, 5, 1, dtype=torch.bool)}, [2, 5])
        >>> seq = seq.update(module.initial_state([2, 5]))
        >>> with set_recurrent_mode(True):
        ...     seq = module(seq)
        >>> seq["features"].shape
        torch.Size([2, 5, 32])
        >>> env_primer = module.make_tensordict_primer()  # env.append_transform(env_primer)
        >>> features, *_ = module(obs=torch.randn(4, 8), is_init=torch.ones(4, 1, dtype=torch.bool))
        >>> features.shape
        torch.Size([4, 32])
    """

    def __init__(
        self,
        config: MoPConfig,
        *,
        in_key: NestedKey = "embed",
        out_key: NestedKey = "features",
        state_key: str = "recurrent_state",
        routing_key: str = "routing",
        implementation: ImplementationChoice = "auto",
        default_recurrent_mode: bool | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self._recurrent_mode = default_recurrent_mode
        self.core = MoPCore(config, implementation)
        self.in_key = in_key
        self.out_key = out_key
        self.state_key = state_key
        # Per block, the (key, size) of each state, router first: the core's state order.
        self.block_state_keys: list[list[tuple[tuple[str, ...], int]]] = []
        for layer, block in enumerate(self.core.blocks):
            names = ["router"] + [f"expert{i}" for i in block.stateful_experts]
            self.block_state_keys.append(
                [
                    ((state_key, f"block{layer}", name), size)
                    for name, size in zip(names, block.state_sizes)
                ]
            )
        self.state_keys = [key for block in self.block_state_keys for key, _ in block]
        self.routing_keys = [(routing_key, f"block{layer}") for layer in range(config.num_blocks)]
        self.cost_key = (routing_key, "cost")
        self.in_keys = [in_key, *self.state_keys, "is_init"]
        self.out_keys = [
            out_key,
            *[("next", *key) for key in self.state_keys],
            *self.routing_keys,
            self.cost_key,
        ]

    # ------------------------------------------------------------------ TorchRL plumbing
    @property
    def recurrent_mode(self) -> bool:
        """The mode in effect: the ``set_recurrent_mode`` context if any, else the default."""
        mode = recurrent_mode()
        return bool(self._recurrent_mode) if mode is None else bool(mode)

    @property
    def canonical_keys(self) -> list[NestedKey]:
        """The keys whose memory layout matters to this module (its in and out keys)."""
        return [*self.in_keys, *self.out_keys]

    def canonicalize(self, data: TensorDictBase, *, inplace: bool = False) -> TensorDictBase:
        """``data`` with the :attr:`canonical_keys` present made contiguous, other entries
        untouched (what :func:`torchrl.modules.canonicalize_rnn_subset` does for several
        modules at once)."""
        return canonicalize_rnn_subset(data, [self], inplace=inplace)

    def make_tensordict_primer(self) -> TensorDictPrimer:
        """A primer declaring every hidden state, for ``env.append_transform(...)``.

        Collectors with ``auto_register_policy_transforms=True``, ``GymEnv(..., policy=...)``
        and :func:`torchrl.modules.utils.get_primers_from_module` find it on their own.
        """
        spec = Composite()
        for block in self.block_state_keys:
            for key, size in block:
                spec[key] = Unbounded(shape=(1, size))
        return TensorDictPrimer(spec, expand_specs=True)

    def initial_state(
        self, batch_size: Sequence[int] | int = (), device: torch.device | str | None = None
    ) -> TensorDict:
        """Zero hidden states ``[*batch_size, 1, h]`` for hand-written loops."""
        batch_size = [batch_size] if isinstance(batch_size, int) else list(batch_size)
        td = TensorDict({}, batch_size=batch_size, device=device)
        for block in self.block_state_keys:
            for key, size in block:
                td.set(key, torch.zeros(*batch_size, 1, size, device=device))
        return td

    def routing_info(self, td: TensorDictBase) -> dict[str, torch.Tensor]:
        """Routing outputs of a TensorDict this module has processed.

        Returns ``{"block{l}": weights [*batch, k_l], ..., "cost": [*batch]}``: block ``l``'s
        mixing weights over its experts in the order of ``config.layers[l]`` (identity experts
        included) and the routing cost of each step.
        """
        out = {key[-1]: td.get(key) for key in self.routing_keys}
        out["cost"] = td.get(self.cost_key)
        return out

    def set_inference_knobs(
        self, *, weight_threshold: float = 0.0, disable_largest: bool = False
    ) -> MoPModule:
        """Ablation knobs: mask experts whose weight is below ``weight_threshold`` (the largest
        weight is always kept; weights renormalised), and/or disable each block's largest
        expert."""
        if not 0.0 <= weight_threshold < 1.0:
            raise ValueError(f"weight_threshold must be in [0, 1), got {weight_threshold!r}")
        for block in self.core.blocks:
            block.weight_threshold = float(weight_threshold)
            block.disable_largest = bool(disable_largest)
        return self

    # ------------------------------------------------------------------ forward
    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        # Tensors are read, reshaped and written one by one: reshaping the whole TensorDict
        # in and out cost about as much as the core's step at batch 64.
        recurrent = self.recurrent_mode
        shape = tensordict.batch_size
        if recurrent and len(shape) == 0:
            raise ValueError(
                "MoPModule in recurrent mode needs a time dimension: got a 0-d TensorDict"
            )
        steps = shape[-1] if recurrent else 1
        n = shape.numel() // max(steps, 1)

        x = tensordict.get(self.in_key, None)
        if x is None:
            raise KeyError(f"MoPModule: input key {self.in_key!r} is missing from the TensorDict")
        if x.shape[-1] != self.config.input_dim:
            raise ValueError(
                f"MoPModule: {self.in_key!r} has last dim {x.shape[-1]}, but "
                f"config.input_dim is {self.config.input_dim}"
            )
        dtype = next(self.core.parameters()).dtype
        if x.dtype != dtype:
            raise TypeError(
                f"MoPModule: {self.in_key!r} has dtype {x.dtype}, expected {dtype} (the module's "
                "parameters)"
            )
        x = x.reshape(n, steps, x.shape[-1])
        is_init = tensordict.get("is_init", None)
        if is_init is None:
            raise KeyError(
                "MoPModule: 'is_init' is missing; add torchrl.envs.InitTracker() to the env"
            )
        if is_init.dtype != torch.bool:
            raise TypeError(f"MoPModule: 'is_init' has dtype {is_init.dtype}, expected torch.bool")
        is_init = is_init.reshape(n, steps)
        stored = self._stored_states(tensordict, x, is_init, recurrent)

        if recurrent:
            starts = is_init.clone()
            starts[:, 0] = True
            out = self.core(x, stored, starts)
            # ("next", state): each segment's final state at its last step, zeros elsewhere.
            ends = torch.ones_like(starts)
            ends[:, :-1] = starts[:, 1:]
            ends = ends.unsqueeze(-1).to(x.dtype)
            states = [[s * ends for s in block] for block in out.states]
        else:
            # Step mode: reset where is_init, one step from the stored state.
            out = self.core(
                x, [[torch.where(is_init, 0.0, s[:, 0]) for s in block] for block in stored]
            )
            states = out.states
        tensordict.set(self.out_key, out.features.reshape(*shape, out.features.shape[-1]))
        for block_keys, block_states in zip(self.block_state_keys, states):
            for (key, size), state in zip(block_keys, block_states):
                tensordict.set(("next", *key), state.reshape(*shape, 1, size))
        for key, value in zip(self.routing_keys, out.weights):
            tensordict.set(key, value.reshape(*shape, value.shape[-1]))
        tensordict.set(self.cost_key, out.cost.reshape(shape))
        return tensordict

    def _stored_states(
        self, tensordict: TensorDictBase, x: torch.Tensor, is_init: torch.Tensor, recurrent: bool
    ) -> list[list[torch.Tensor]]:
        """Stored states ``[N, T, h]`` per block (zeros where allowed to be missing)."""
        n, steps = is_init.shape
        stored, missing = [], []
        for block in self.block_state_keys:
            states = []
            for key, size in block:
                value = tensordict.get(key, None)
                if value is None:
                    missing.append(key)
                    value = x.new_zeros(n, steps, size)
                elif value.shape[-1] != size:
                    raise ValueError(
                        f"MoPModule: state {key} has size {value.shape[-1]}, expected {size}"
                    )
                elif value.dtype != x.dtype:
                    raise TypeError(
                        f"MoPModule: state {key} has dtype {value.dtype}, expected {x.dtype}"
                    )
                states.append(value.reshape(n, steps, size))
            stored.append(states)
        if missing and not bool((is_init[:, 0] if recurrent else is_init).all()):
            raise KeyError(
                f"MoPModule: hidden states {missing} are missing where is_init is False. "
                "Register the module's primer with the environment "
                "(env.append_transform(policy_module.make_tensordict_primer()), or "
                "Collector(..., auto_register_policy_transforms=True)): without it TorchRL "
                "drops the recurrent state between steps."
            )
        return stored
