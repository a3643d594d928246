"""BabyAI actor/critic: encoder, both cores, and state flow through a real parallel collector."""

import pytest
import torch
from tensordict.nn import InteractionType
from torchrl.collectors import Collector
from torchrl.modules import GRUModule, LSTMModule

from mop_torchrl import MoPConfig, MoPModule
from mop_torchrl.babyai.envs import make_babyai_env
from mop_torchrl.babyai.policy import EncoderConfig, ObservationEncoder, make_policy, policy_parts

SMALL = {
    "mop": MoPConfig(layers="0,8;8,16", intermediate_dim=16, router_dim=8),
    "encoder": EncoderConfig(image_channels=8, instr_dim=16),
}


def test_unique_mission_encoding_matches_per_row_encoding():
    encoder = ObservationEncoder(EncoderConfig(image_channels=8, instr_dim=16))
    missions = torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0], [5, 6, 7, 0], [9, 0, 0, 0]])
    batched = encoder.encode_missions(missions)
    for row, expected in zip(missions, batched):
        torch.testing.assert_close(encoder.encode_missions(row[None])[0], expected)
    torch.testing.assert_close(batched[0], batched[2])


def test_encoder_rejects_out_of_range_cells():
    encoder = ObservationEncoder()
    image = torch.zeros(1, 7, 7, 3, dtype=torch.uint8)
    image[0, 3, 3, 1] = 6  # colour index 6 does not exist (6 colours: 0..5)
    zero = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="out of range"):
        encoder(image, zero, zero, torch.ones(1, 4, dtype=torch.long))


def test_gru_baseline_differs_only_in_the_core():
    mop_actor, _ = make_policy("mop", **SMALL)
    gru_actor, _ = make_policy("gru", gru_hidden_size=16, encoder=SMALL["encoder"])
    mop_parts, gru_parts = policy_parts(mop_actor), policy_parts(gru_actor)
    assert [type(m.module) for m in (mop_parts.encoder, mop_parts.head)] == [
        type(m.module) for m in (gru_parts.encoder, gru_parts.head)
    ]
    assert isinstance(mop_parts.core, MoPModule) and isinstance(gru_parts.core, GRUModule)
    written = [k for k in mop_parts.logits.out_keys if k in ("embed", "features", "logits")]
    assert written == ["embed", "features", "logits"]  # encoder → core → head
    lstm_actor, _ = make_policy("lstm", gru_hidden_size=16, encoder=SMALL["encoder"])
    assert isinstance(policy_parts(lstm_actor).core, LSTMModule)
    with pytest.raises(ValueError, match="transformer"):
        make_policy("transformer")


def _as_tuple(key):
    return key if isinstance(key, tuple) else (key,)


@pytest.mark.parametrize("kind, parallel", [("mop", True), ("gru", False)])
@pytest.mark.subprocess
@pytest.mark.slow
def test_collector_propagates_and_resets_hidden_states(kind, parallel):
    actor, critic = make_policy(kind, gru_hidden_size=16, **SMALL)
    env = make_babyai_env("GoToRedBall", num_envs=2, seed=3, expert=True, parallel=parallel)
    collector = Collector(
        env,
        actor,
        frames_per_batch=160,
        total_frames=160,
        exploration_type=InteractionType.RANDOM,
        auto_register_policy_transforms=True,
    )
    data = next(iter(collector)).reshape(2, -1)
    collector.shutdown()
    keys = [k for k in map(_as_tuple, data.keys(True, True)) if k[0] == "recurrent_state"]
    assert keys
    is_init = data["is_init"].squeeze(-1)
    assert is_init[:, 0].all() and is_init[:, 1:].any(), "episodes should end inside the batch"
    for key in keys:
        stored, nxt = data[key], data[("next", *key)]
        assert (stored[is_init] == 0).all()
        carried = ~is_init[:, 1:]
        torch.testing.assert_close(stored[:, 1:][carried], nxt[:, :-1][carried])
        assert stored[~is_init].abs().sum() > 0
    assert (data["expert_action"] >= -1).all() and (data["expert_action"] <= 6).all()
    # The critic reads the same keys in recurrent mode.
    from torchrl.modules import set_recurrent_mode

    with set_recurrent_mode(True), torch.no_grad():
        values = critic(data.copy())["state_value"]
    assert values.shape == (2, 80, 1) and torch.isfinite(values).all()


def test_traced_mission_encoding_matches_deduplicated():
    """The graph-safe encoding (every row over all tokens) equals the de-duplicated one."""
    encoder = ObservationEncoder(EncoderConfig(image_channels=8, instr_dim=16))
    missions = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 0, 0, 0], [5, 6, 7, 0, 0], [9, 0, 0, 0, 0]])
    torch.testing.assert_close(encoder._encode_tokens(missions), encoder.encode_missions(missions))


@pytest.mark.slow
def test_actor_step_compiles_as_one_graph():
    """No data-dependent shape or host sync in the step: dynamo captures encoder, core and head
    in one graph (the CPU-side proof that a CUDA graph can capture it). The "eager" backend
    keeps the test fast: graph breaks are dynamo's, whatever the backend."""
    from tensordict.nn import set_interaction_type

    torch.manual_seed(0)
    actor, _ = make_policy("mop", **SMALL)
    actor.eval()
    env = make_babyai_env("GoToLocal", num_envs=3, seed=0, parallel=False, policy=actor)
    td = env.rollout(3, actor, break_when_any_done=False)[:, -1]["next"]  # stored states set
    env.close()
    compiled = torch.compile(actor, fullgraph=True, backend="eager")
    with (
        torch._dynamo.config.patch(allow_rnn=True),
        torch.no_grad(),
        set_interaction_type(InteractionType.DETERMINISTIC),
    ):
        expected = actor(td.clone())
        for _ in range(2):
            torch.testing.assert_close(compiled(td.clone()), expected)


def test_gae_runs_the_critic_under_vmap():
    """GAE without deactivate_vmap vmaps encoder and core; the values equal the looped ones."""
    from torchrl.modules import set_recurrent_mode
    from torchrl.objectives.value import GAE

    torch.manual_seed(0)
    actor, critic = make_policy("mop", **SMALL)
    env = make_babyai_env("GoToRedBall", num_envs=2, seed=1, parallel=False, policy=actor)
    data = env.rollout(12, actor.eval(), break_when_any_done=False)
    env.close()
    data["next", "terminated"] = data["next", "done"].clone()
    data.names = [None, "time"]
    advantages = []
    for deactivate_vmap in (False, True):
        gae = GAE(gamma=0.9, lmbda=0.95, value_network=critic, deactivate_vmap=deactivate_vmap)
        with torch.no_grad(), set_recurrent_mode(True):
            advantages.append(gae(data.clone())["advantage"])
    torch.testing.assert_close(advantages[0], advantages[1])


def test_state_dict_names_are_those_of_checkpoints_written_before_the_parts_were_named():
    """policy_parts selects by key; the positional state-dict names (what load_modules compares
    with a checkpoint's) are those the pre-issue-18 layout wrote."""
    for kind, count, core_key in [
        ("mop", 64, "module.0.module.1.core.input_proj.weight"),
        ("gru", 26, "module.0.module.1.gru.weight_ih_l0"),
    ]:
        actor, critic = make_policy(kind, gru_hidden_size=16, **SMALL)
        names, critic_names = list(actor.state_dict()), list(critic.state_dict())
        assert len(names) == len(critic_names) == count
        assert names[0] == "module.0.module.0.module.cell_embedding.weight"
        assert core_key in names and names[-1] == "module.0.module.2.module.bias"
        assert critic_names[0] == "module.0.module.cell_embedding.weight"
        assert critic_names[-1] == "module.2.module.bias"


def test_stem_with_the_embedding_folded_in_equals_the_convolution_of_the_lookup_sum():
    """The stem convolves multi-hot cell codes with the embedding folded into its weights: the
    same values and gradients as embedding each attribute, summing, then convolving."""
    from mop_torchrl.babyai.policy import ObservationEncoder

    torch.manual_seed(0)
    encoder = ObservationEncoder().double()
    image = torch.stack([torch.randint(0, n, (64, 7, 7)) for n in (11, 6, 3)], -1)
    cells = encoder.cell_embedding(image + encoder.attribute_offset).sum(-2)
    unfolded = torch.relu(encoder.stem(cells.permute(0, 3, 1, 2)))
    folded = encoder._stem(image)
    torch.testing.assert_close(folded, unfolded, rtol=0, atol=1e-12)
    params = [encoder.cell_embedding.weight, encoder.stem.weight, encoder.stem.bias]
    probe = torch.randn_like(folded)
    grads_unfolded = torch.autograd.grad((unfolded * probe).sum(), params)
    grads_folded = torch.autograd.grad((folded * probe).sum(), params)
    for got, expected in zip(grads_folded, grads_unfolded):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
