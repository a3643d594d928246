"""BabyAI actor and critic: observation encoder → recurrent core (MoP or GRU) → heads.

The encoder follows BabyAI 1.1: each image cell's object, colour and state are embedded and
summed ("bag of words"), and the convolutional features are conditioned on the instruction
with residual FiLM layers, so that colour and type can be grounded among distractors (plain
concatenation plateaus on GoToLocal, SPEC section 4). Unlike BabyAI's final max-pool, the
FiLM-ed map is reduced to a few channels per cell and flattened: with only three 3x3 layers,
pooling lost where the target is, and online imitation stayed at chance accuracy.

The instruction is encoded by a GRU over the mission tokens. In eager mode on CPU, identical
missions in a batch are encoded once and only up to the longest one (this halves the instruction
time on a [16, 32] training batch, and running all 72 tokens instead cost ~6x the de-duplicated
encoding of a 16-env step); a cache across collection steps was not worth it (encoding is
0.22 ms of a 3.4 ms 16-env policy step). That de-duplication has data-dependent shapes (a host
sync), so when compiled (``torch.compile``), under ``torch.vmap`` or on an accelerator every row
runs over all tokens instead: the actor step then has no data-dependent shape or host sync and
compiles as one graph (``fullgraph=True``, with ``torch._dynamo.config.allow_rnn = True``,
without which dynamo refuses any ``nn.GRU``), the CPU-side proof that a CUDA graph can capture it.

``make_policy(kind="mop" | "gru")`` swaps only the recurrent core between the two policies;
:func:`policy_parts` names an actor's parts (encoder, core, head) by the keys they write.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from tensordict.nn import (
    InteractionType,
    TensorDictModule,
    TensorDictModuleBase,
    TensorDictSequential,
)
from torch import nn
from torchrl.modules import GRUModule, LSTMModule, ProbabilisticActor

from mop_torchrl.babyai.levels import NUM_ACTIONS
from mop_torchrl.babyai.tokenizer import MissionTokenizer
from mop_torchrl.core.config import ConfigError, MoPConfig, check_fields, setting
from mop_torchrl.core.fused import functorch_active, gru_recurrence
from mop_torchrl.core.module import MoPModule

__all__ = ["EncoderConfig", "ObservationEncoder", "PolicyParts", "make_policy", "policy_parts"]

# minigrid's OBJECT_TO_IDX has 11 entries, COLOR_TO_IDX 6, STATE_TO_IDX 3.
_ATTRIBUTE_SIZES = (11, 6, 3)


@dataclasses.dataclass
class EncoderConfig:
    """Sizes of the observation encoder (each a positive integer; help in the field metadata)."""

    image_channels: int = setting(
        32, "Channels of the cell embeddings and of the convolutional/FiLM layers."
    )
    map_channels: int = setting(
        8, "Channels per cell kept when the FiLM-ed map is flattened (keeps where things are)."
    )
    film_layers: int = setting(2, "Residual FiLM layers conditioning the image on the instruction.")
    word_dim: int = setting(32, "Mission token embedding size.")
    instr_dim: int = setting(64, "Instruction GRU hidden size.")
    state_dim: int = setting(8, "Direction and carrying embedding sizes.")

    def __post_init__(self) -> None:
        check_fields(self)
        for field in dataclasses.fields(self):
            if getattr(self, field.name) <= 0:
                raise ConfigError(field.name, f"must be > 0, got {getattr(self, field.name)}")

    @property
    def output_dim(self) -> int:
        return self.map_channels * 49 + self.instr_dim + 2 * self.state_dim


class _FiLM(nn.Module):
    """``relu(γ(instr) · conv(x) + β(instr)) + x``."""

    def __init__(self, channels: int, instr_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.film = nn.Linear(instr_dim, 2 * channels)

    def forward(self, x: torch.Tensor, instr: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(instr)[..., None, None].chunk(2, dim=1)
        return F.relu(gamma * self.conv(x) + beta) + x


class ObservationEncoder(nn.Module):
    """Encodes a BabyAI observation into one feature vector.

    Inputs (any batch shape ``*B``): ``image`` uint8 ``[*B, 7, 7, 3]``, ``direction``
    ``[*B]`` or ``[*B, 1]`` in 0..3, ``carrying`` ``[*B]`` or ``[*B, 1]`` in {0, 1}, ``mission``
    int64 tokens ``[*B, L]`` (0 = padding). Output ``[*B, config.output_dim]``.

    Examples:
        >>> import torch
        >>> enc = ObservationEncoder()
        >>> image = torch.zeros(2, 7, 7, 3, dtype=torch.uint8)
        >>> mission = torch.tensor([[5, 6, 0], [5, 6, 0]])
        >>> enc(image, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), mission).shape
        torch.Size([2, 472])
    """

    def __init__(self, config: EncoderConfig | None = None, vocab_size: int | None = None) -> None:
        super().__init__()
        self.config = config = config or EncoderConfig()
        vocab_size = vocab_size or MissionTokenizer().vocab_size
        channels = config.image_channels
        self.cell_embedding = nn.Embedding(sum(_ATTRIBUTE_SIZES), channels)
        self.register_buffer(
            "attribute_offset",
            torch.tensor([0, _ATTRIBUTE_SIZES[0], _ATTRIBUTE_SIZES[0] + _ATTRIBUTE_SIZES[1]]),
            persistent=False,
        )
        self.stem = nn.Conv2d(channels, channels, 3, padding=1)
        self.films = nn.ModuleList(
            _FiLM(channels, config.instr_dim) for _ in range(config.film_layers)
        )
        self.reduce = nn.Conv2d(channels, config.map_channels, 1)
        self.word_embedding = nn.Embedding(vocab_size, config.word_dim, padding_idx=0)
        self.instr_gru = nn.GRU(config.word_dim, config.instr_dim, batch_first=True)
        self.direction_embedding = nn.Embedding(4, config.state_dim)
        self.carrying_embedding = nn.Embedding(2, config.state_dim)

    def encode_missions(self, mission: torch.Tensor) -> torch.Tensor:
        """Instruction encodings ``[N, instr_dim]`` of tokens ``[N, L]`` (see the module notes:
        each unique row once in eager mode on CPU, every row over all ``L`` tokens otherwise)."""
        if _traced_or_accelerated(mission):
            return self._encode_tokens(mission)
        unique, inverse = torch.unique(mission, dim=0, return_inverse=True)
        longest = int((unique != 0).sum(-1).max().clamp(min=1))
        return self._encode_tokens(unique[:, :longest])[inverse]

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The instruction GRU's state after each row's last token (0 = padding)."""
        words = self.word_embedding(tokens)
        if functorch_active():  # nn.GRU has no batching rule; the scan does
            h0 = words.new_zeros(words.shape[0], self.config.instr_dim)
            out = gru_recurrence([self.instr_gru], words, [h0])[0]
        else:
            out, _ = self.instr_gru(words)
        last = (tokens != 0).sum(-1).clamp(min=1) - 1
        return out[torch.arange(out.shape[0], device=out.device), last]

    def _check_cells(self, image: torch.Tensor) -> None:
        """Cells out of range would silently index another attribute's embedding."""
        if functorch_active():  # no batching rule for asserts; collected data was checked
            return
        message = f"image attributes out of range: expected < {_ATTRIBUTE_SIZES}"
        in_range = (image.amax((0, 1, 2)) < image.new_tensor(_ATTRIBUTE_SIZES)).all()
        if _traced_or_accelerated(image):
            torch._assert_async(in_range, message)  # no host sync: capturable
        elif not in_range:
            raise ValueError(message)

    def _stem(self, image: torch.Tensor) -> torch.Tensor:
        """``relu(stem(cells))`` where a cell is the sum of its three attribute embeddings.

        Both maps are linear, so the embedding is folded into the stem's weights and the stem
        convolves the cells' multi-hot codes (20 channels, not 32): the same function (equal in
        float64, values and gradients), but no gradient is computed for the stem's input and
        the embedding lookup's backward (a sort over every cell) is gone. Zero padding is the
        same in both forms: the embedding has no bias.
        """
        table = self.cell_embedding.weight
        index = (image + self.attribute_offset).reshape(-1, len(_ATTRIBUTE_SIZES))
        multi_hot = table.new_zeros(index.shape[0], table.shape[0]).scatter(1, index, 1.0)
        multi_hot = multi_hot.view(*image.shape[:-1], -1).permute(0, 3, 1, 2)  # channels_last
        weight = torch.einsum("oikl,vi->ovkl", self.stem.weight, table)
        return F.relu(F.conv2d(multi_hot, weight, self.stem.bias, padding=1))

    def forward(
        self,
        image: torch.Tensor,
        direction: torch.Tensor,
        carrying: torch.Tensor,
        mission: torch.Tensor,
    ) -> torch.Tensor:
        batch = image.shape[:-3]
        image = image.reshape(-1, *image.shape[-3:]).long()
        self._check_cells(image)
        x = self._stem(image)
        instr = self.encode_missions(mission.reshape(-1, mission.shape[-1]))
        for film in self.films:
            x = film(x, instr)
        # Flattened, not pooled: which action is right depends on where the target is.
        image_features = F.relu(self.reduce(x)).flatten(1)
        features = torch.cat(
            [
                image_features,
                instr,
                self.direction_embedding(direction.reshape(-1).long()),
                self.carrying_embedding(carrying.reshape(-1).long()),
            ],
            -1,
        )
        return features.reshape(*batch, -1)


def _traced_or_accelerated(tensor: torch.Tensor) -> bool:
    """Whether data-dependent shapes and host syncs must be avoided for ``tensor``'s step."""
    return torch.compiler.is_compiling() or functorch_active() or tensor.device.type != "cpu"


OBSERVATION_KEYS = ["image", "direction", "carrying", "mission"]


def make_core(
    kind: Literal["mop", "gru", "lstm"],
    input_dim: int,
    mop: MoPConfig | None = None,
    gru_hidden_size: int = 512,
) -> tuple[TensorDictModuleBase, int]:
    """The recurrent core reading ``"embed"`` and writing ``"features"``, and its output width.

    ``gru_hidden_size`` is the hidden size of the ``"gru"`` and ``"lstm"`` baselines.

    Examples:
        >>> core, width = make_core("lstm", 8, gru_hidden_size=16)
        >>> width, core.in_keys
        (16, ['embed', 'recurrent_state_h', 'recurrent_state_c', 'is_init'])
    """
    if kind == "mop":
        config = dataclasses.replace(mop or MoPConfig.from_preset("seed"), input_dim=input_dim)
        return MoPModule(config, in_key="embed", out_key="features"), config.intermediate_dim
    if kind in ("gru", "lstm"):
        module = GRUModule if kind == "gru" else LSTMModule
        core = module(input_dim, gru_hidden_size, in_key="embed", out_key="features")
        return core, gru_hidden_size
    raise ValueError(f"unknown policy kind {kind!r}; choose 'mop', 'gru' or 'lstm'")


def make_policy(
    kind: Literal["mop", "gru"] = "mop",
    *,
    num_actions: int = NUM_ACTIONS,
    mop: MoPConfig | None = None,
    gru_hidden_size: int = 512,
    encoder: EncoderConfig | None = None,
) -> tuple[ProbabilisticActor, TensorDictSequential]:
    """Builds the BabyAI actor and critic around a MoP or GRU core.

    The actor is ``encoder → core → logits head`` wrapped in a ``ProbabilisticActor`` over
    categorical logits (``action`` int64, ``sample_log_prob``; its deterministic mode is the
    greedy action). The critic (for RL) shares the encoder and the core, with a value head.
    Both declare their primers, so collectors register them automatically.

    Examples:
        >>> from mop_torchrl.babyai.envs import make_babyai_env
        >>> actor, critic = make_policy("mop")
        >>> env = make_babyai_env("GoToRedBall", policy=actor)
        >>> td = env.rollout(3, actor)
        >>> td["action"].shape, td["logits"].shape
        (torch.Size([3]), torch.Size([3, 7]))
    """
    encoder_module = ObservationEncoder(encoder)
    encode = TensorDictModule(encoder_module, in_keys=OBSERVATION_KEYS, out_keys=["embed"])
    core, feature_dim = make_core(kind, encoder_module.config.output_dim, mop, gru_hidden_size)
    head = TensorDictModule(nn.Linear(feature_dim, num_actions), ["features"], ["logits"])
    actor = ProbabilisticActor(
        TensorDictSequential(encode, core, head),
        in_keys=["logits"],
        out_keys=["action"],
        distribution_class=torch.distributions.Categorical,
        return_log_prob=True,
        default_interaction_type=InteractionType.RANDOM,
    )
    value_head = TensorDictModule(nn.Linear(feature_dim, 1), ["features"], ["state_value"])
    critic = TensorDictSequential(encode, core, value_head)
    return actor, critic


class PolicyParts(NamedTuple):
    """An actor's parts, each a TensorDict module (see :func:`policy_parts`)."""

    encoder: TensorDictModuleBase
    """Observations → ``"embed"``."""
    core: TensorDictModuleBase
    """``"embed"``, the stored state and ``"is_init"`` → ``"features"`` (and ``"routing"``, MoP)."""
    head: TensorDictModuleBase
    """``"features"`` → ``"logits"``."""
    logits: TensorDictSequential
    """The three in order: the actor without sampling (its ``det_part``). Run it in recurrent
    mode to replay ``[B, T]`` sequences."""


def policy_parts(actor: ProbabilisticActor) -> PolicyParts:
    """The parts of a :func:`make_policy` actor, selected by the key each one writes.

    Selection by key, not position, so that code reads ``policy_parts(actor).core`` and the
    checkpoint's state-dict names (positional, ``module.0.module.1...``) stay as they were.

    Examples:
        >>> actor, _ = make_policy("gru", gru_hidden_size=16)
        >>> parts = policy_parts(actor)
        >>> type(parts.core).__name__, parts.head.out_keys, parts.logits.out_keys[-1]
        ('GRUModule', ['logits'], 'logits')
    """
    leaves = [
        m
        for m in actor.modules()
        if isinstance(m, TensorDictModuleBase) and not isinstance(m, TensorDictSequential)
    ]
    writers = {
        key: [m for m in leaves if key in m.out_keys] for key in ("embed", "features", "logits")
    }
    for key, found in writers.items():
        if len(found) != 1:
            raise ValueError(
                f"expected one module writing {key!r} in the actor, found {len(found)}"
            )
    encoder, core, head = (found[0] for found in writers.values())
    return PolicyParts(encoder, core, head, actor.det_part)
