"""The training objectives as TorchRL LossModules: ImitationLoss and RoutingClipPPOLoss."""

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from tensordict.nn import TensorDictModule, TensorDictSequential
from torchrl.modules import set_recurrent_mode

from mop_torchrl import MoPConfig
from mop_torchrl.babyai.policy import EncoderConfig, make_policy, policy_parts
from mop_torchrl.core.model import routing_cost_loss
from mop_torchrl.train.config import TrainConfig
from mop_torchrl.train.losses import (
    ImitationLoss,
    RoutingClipPPOLoss,
    learner_autocast,
    total_loss,
)

SMALL = {
    "mop": MoPConfig(layers="0,8;8,16", intermediate_dim=16, router_dim=8),
    "encoder": EncoderConfig(image_channels=8, instr_dim=16),
    "gru_hidden_size": 16,
}
B, T = 3, 6


def make_batch(actor, seed: int = 0) -> TensorDict:
    """Random observations [B, T] with random stored states, a restart in the middle of row 0
    and a few ignored labels (-1)."""
    gen = torch.Generator().manual_seed(seed)
    batch = TensorDict(
        image=torch.randint(3, (B, T, 7, 7, 3), dtype=torch.uint8, generator=gen),
        direction=torch.randint(4, (B, T), generator=gen),
        carrying=torch.randint(2, (B, T), generator=gen),
        mission=torch.randint(1, 9, (B, T, 6), generator=gen),
        is_init=torch.zeros(B, T, 1, dtype=torch.bool),
        expert_action=torch.randint(7, (B, T), generator=gen),
        batch_size=[B, T],
    )
    batch["is_init"][:, 0] = True
    batch["is_init"][0, 3] = True
    batch["expert_action"][1, :2] = -1
    batch["expert_action"][2, 4] = -1
    primer = policy_parts(actor).core.make_tensordict_primer()
    states = primer.primers.zero((B, T))
    for key, value in states.items(True, True):
        states[key] = torch.randn(value.shape, generator=gen)
    return batch.update(states)


def replay(actor, batch) -> TensorDict:
    with set_recurrent_mode(True):
        return policy_parts(actor).logits(batch.copy())


@pytest.mark.parametrize("mode", ["scaled", "plain"])
def test_losses_equal_the_hand_computation(mode):
    torch.manual_seed(0)
    actor, _ = make_policy("mop", **SMALL)
    actor.eval()  # no routing dropout: two passes give the same numbers
    batch = make_batch(actor)
    out = ImitationLoss(actor, alpha=0.05, epsilon=0.1, cost_mode=mode)(batch)

    hand = replay(actor, batch)
    labels = batch["expert_action"]
    valid = labels >= 0
    task = F.cross_entropy(hand["logits"][valid], labels[valid])
    expected = routing_cost_loss(task, hand["routing", "cost"], 0.05, 0.1, mode)
    torch.testing.assert_close(out["loss_imitation"], task)
    torch.testing.assert_close(out["loss_imitation"] + out["loss_routing"], expected)
    torch.testing.assert_close(total_loss(out), expected)
    hits = (hand["logits"].argmax(-1) == labels)[valid].float().mean()
    torch.testing.assert_close(out["accuracy"], hits)
    torch.testing.assert_close(out["label_fraction"], valid.float().mean())
    torch.testing.assert_close(out["routing_cost"], hand["routing", "cost"].mean())
    for block in ("block0", "block1"):
        weights = hand["routing", block]
        torch.testing.assert_close(
            out["expert_weight", block], weights.reshape(-1, weights.shape[-1]).mean(0)
        )
    metrics = out.exclude("loss_imitation", "loss_routing")
    assert not any(v.requires_grad for v in metrics.values(True, True))
    assert set(batch.keys(True, True)) == set(make_batch(actor).keys(True, True))  # untouched


def test_ignored_labels_count_for_nothing():
    torch.manual_seed(0)
    actor, _ = make_policy("mop", **SMALL)
    actor.eval()
    batch = make_batch(actor)
    loss = ImitationLoss(actor, alpha=0.0)
    base = loss(batch)
    assert base["loss_routing"] == 0  # alpha 0: the task loss alone
    masked = batch.clone()
    masked["expert_action"][0] = -1  # a whole row ignored
    out = loss(masked)
    logits = replay(actor, batch)["logits"]
    keep = masked["expert_action"] >= 0
    expected = F.cross_entropy(logits[keep], batch["expert_action"][keep])
    torch.testing.assert_close(out["loss_imitation"], expected)
    torch.testing.assert_close(out["label_fraction"], keep.float().mean())
    assert out["loss_imitation"] != base["loss_imitation"]


def test_set_keys_reads_the_renamed_entries():
    """Labels, logits and routing outputs under other names: the loss follows set_keys."""
    torch.manual_seed(0)
    actor, _ = make_policy("mop", **SMALL)
    actor.eval()

    def rename(logits, cost, block0, block1):
        return 2 * logits, 3 * cost, block0, block1

    moved = TensorDictModule(
        rename,
        in_keys=["logits", ("routing", "cost"), ("routing", "block0"), ("routing", "block1")],
        out_keys=["scores", ("moe", "cost"), ("moe", "block0"), ("moe", "block1")],
    )
    policy = TensorDictSequential(policy_parts(actor).logits, moved)
    batch = make_batch(actor)
    batch["label"] = batch.pop("expert_action")
    loss = ImitationLoss(policy, alpha=0.05, cost_mode="plain")
    loss.set_keys(expert_action="label", logits="scores", routing_cost=("moe", "cost"))
    loss.set_keys(routing="moe")
    out = loss(batch)

    hand = replay(actor, batch)
    valid = batch["label"] >= 0
    task = F.cross_entropy(2 * hand["logits"][valid], batch["label"][valid])
    torch.testing.assert_close(out["loss_imitation"], task)
    torch.testing.assert_close(out["loss_routing"], 0.05 * 3 * hand["routing", "cost"].mean())
    assert set(out["expert_weight"].keys()) == {"block0", "block1"}
    assert "label" in loss.in_keys
    with pytest.raises(ValueError, match="not an accepted tensordict key"):
        loss.set_keys(label="expert_action")


def test_gru_core_has_no_routing_term():
    torch.manual_seed(0)
    actor, _ = make_policy("gru", **SMALL)
    actor.eval()
    batch = make_batch(actor)
    out = ImitationLoss(actor)(batch)
    assert "loss_routing" not in out and "routing_cost" not in out
    logits = replay(actor, batch)["logits"]
    valid = batch["expert_action"] >= 0
    expected = F.cross_entropy(logits[valid], batch["expert_action"][valid])
    torch.testing.assert_close(total_loss(out), expected)


def test_gradients_reach_the_routers():
    torch.manual_seed(0)
    actor, _ = make_policy("mop", **SMALL)
    batch = make_batch(actor)
    out = ImitationLoss(actor, alpha=0.1)(batch)
    out["loss_routing"].backward()  # the routing term alone
    routers = {
        name: p.grad for name, p in policy_parts(actor).core.named_parameters() if ".router" in name
    }
    assert routers and all(g is not None and g.abs().sum() > 0 for g in routers.values())


@pytest.mark.parametrize("kind", ["mop", "gru"])
def test_bfloat16_updates_round_the_float32_ones(kind):
    """Under the learner's autocast the loss is float32 and its value and gradient are the
    float32 ones up to bfloat16 rounding; ``off`` changes nothing."""
    torch.manual_seed(0)
    actor, _ = make_policy(kind, **SMALL)
    batch = make_batch(actor)
    loss_module = ImitationLoss(actor, alpha=0.1)

    def loss_and_grad(autocast: str) -> tuple[torch.Tensor, torch.Tensor]:
        actor.zero_grad()
        with learner_autocast(TrainConfig(autocast=autocast)):
            loss = total_loss(loss_module(batch))
        loss.backward()
        return loss, torch.cat([p.grad.flatten() for p in actor.parameters() if p.grad is not None])

    loss, grad = loss_and_grad("off")
    torch.testing.assert_close(loss, total_loss(loss_module(batch)), rtol=0, atol=0)
    rounded, rounded_grad = loss_and_grad("bfloat16")
    assert rounded.dtype == torch.float32 and rounded_grad.dtype == torch.float32
    assert not torch.equal(rounded, loss)  # the products did run in bfloat16
    torch.testing.assert_close(rounded, loss, rtol=2e-2, atol=0)
    assert F.cosine_similarity(rounded_grad, grad, dim=0) > 0.99


def test_bad_routing_settings_are_rejected():
    actor, _ = make_policy("gru", **SMALL)
    for kwargs, message in [
        ({"alpha": -1.0}, "alpha"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"cost_mode": "squared"}, "cost_mode"),
    ]:
        with pytest.raises(ValueError, match=message):
            ImitationLoss(actor, **kwargs)


def test_ppo_loss_takes_the_routing_cost_from_its_own_actor_pass():
    """loss_routing is α·cost of the actor pass ClipPPOLoss makes: the core runs twice per call
    (actor, critic), not three times (no second actor pass for the cost)."""
    torch.manual_seed(0)
    actor, critic = make_policy("mop", **SMALL)
    actor.eval()
    batch = make_batch(actor)
    with torch.no_grad(), set_recurrent_mode(True):
        batch = actor(batch)  # action, logits, sample_log_prob
    batch["advantage"] = torch.randn(B, T, 1)
    batch["value_target"] = torch.randn(B, T, 1)
    loss = RoutingClipPPOLoss(actor, critic, alpha=0.05, normalize_advantage=True)
    core = policy_parts(actor).core
    calls = []
    hook = core.register_forward_hook(lambda *args: calls.append(1))
    out = loss(batch.exclude("routing"))
    hook.remove()
    assert len(calls) == 2
    hand = replay(actor, batch)
    torch.testing.assert_close(out["loss_routing"], 0.05 * hand["routing", "cost"].mean())
    torch.testing.assert_close(out["routing_cost"], hand["routing", "cost"].mean())
    expected = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
    torch.testing.assert_close(total_loss(out), expected + out["loss_routing"])
    total_loss(out).backward()
    router = dict(core.named_parameters())["core.blocks.0.router_head.weight"]
    assert router.grad is not None and router.grad.abs().sum() > 0
