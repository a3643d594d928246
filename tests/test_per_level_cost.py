"""The routing cost per level (issue 21) and the scaled form's refusal of a negative or non-finite loss."""

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_losses import SMALL, make_batch, replay
from torchrl.modules import set_recurrent_mode

from mop_torchrl.babyai.policy import make_policy
from mop_torchrl.core.config import ConfigError
from mop_torchrl.core.model import grouped_routing_cost_loss, routing_cost_loss
from mop_torchrl.train import TrainConfig, resume_config, train
from mop_torchrl.train.checkpoint import load_checkpoint, save_checkpoint
from mop_torchrl.train.losses import ImitationLoss, total_loss
from mop_torchrl.train.policy import load_actor

LEVELS = "BabyAI-GoToRedBall-v0,BabyAI-GoToLocal-v0"
ALPHA, EPS = 0.05, 0.1


def two_level_batch(actor, seed=0):
    """make_batch's [3, 6] batch; row 0 and the first half of row 2 are level 0, the rest 1."""
    batch = make_batch(actor, seed)
    level = torch.ones(batch.shape, dtype=torch.long)
    level[0] = 0
    level[2, :3] = 0
    batch["level"] = level
    return batch


def per_level_by_hand(logits, labels, level, cost, num_levels, alpha=ALPHA, eps=EPS):
    """Σ_k (n_k/N)·[L_k + α·cost_k/(ε+L_k)], each level's terms computed on its own steps."""
    valid = labels >= 0
    total = 0.0
    for k in range(num_levels):
        mine = valid & (level == k)
        if not mine.any():
            continue
        loss_k = F.cross_entropy(logits[mine], labels[mine])
        cost_k = cost[mine].mean()
        total = total + mine.sum() / valid.sum() * (loss_k + alpha * cost_k / (eps + loss_k))
    return total


@pytest.fixture
def actor():
    torch.manual_seed(0)
    actor, _ = make_policy("mop", **SMALL)
    return actor.eval()  # no routing dropout: two passes give the same numbers


def test_per_level_loss_equals_the_hand_computation_on_two_levels(actor):
    batch = two_level_batch(actor)
    loss = ImitationLoss(actor, alpha=ALPHA, epsilon=EPS, cost_scaling="per_level", num_levels=2)
    out = loss(batch)
    hand = replay(actor, batch)
    labels, valid = batch["expert_action"], batch["expert_action"] >= 0
    expected = per_level_by_hand(hand["logits"], labels, batch["level"], hand["routing", "cost"], 2)
    torch.testing.assert_close(total_loss(out), expected)
    # the imitation term is still the batch cross-entropy: only the routing term changes
    torch.testing.assert_close(
        out["loss_imitation"], F.cross_entropy(hand["logits"][valid], labels[valid])
    )
    batch_form = ImitationLoss(actor, alpha=ALPHA, epsilon=EPS)(batch)
    assert not torch.allclose(out["loss_routing"], batch_form["loss_routing"])
    assert "level" in [k if isinstance(k, str) else k[-1] for k in loss.in_keys]
    # per-level metrics: each level's labelled steps, summed cross-entropy and routing cost
    step_loss = F.cross_entropy(hand["logits"][valid], labels[valid], reduction="none")
    for k in range(2):
        mine = batch["level"][valid] == k
        assert out["level", "steps"][k] == mine.sum()
        torch.testing.assert_close(out["level", "loss_sum"][k], step_loss[mine].sum())
        cost_k = hand["routing", "cost"].reshape(labels.shape)[valid][mine].sum()
        torch.testing.assert_close(out["level", "routing_cost_sum"][k], cost_k)


def test_grouped_form_on_plain_tensors():
    step_loss = torch.tensor([0.2, 0.6, 1.0, 3.0, 7.0])
    cost = torch.tensor([1.0, 2.0, 3.0, 5.0, 100.0])
    group = torch.tensor([0, 0, 1, 1, 1])
    valid = torch.tensor([True, True, True, True, False])
    weights = torch.tensor([0.25, 2.0])
    by_hand = 0.25 * (0.4 + 0.5 * 1.5 / (0.1 + 0.4)) + 2.0 * (2.0 + 0.5 * 4.0 / (0.1 + 2.0))
    out = grouped_routing_cost_loss(step_loss, cost, group, valid, weights, 0.5, 0.1)
    torch.testing.assert_close(out, torch.tensor(by_hand))
    plain = grouped_routing_cost_loss(step_loss, cost, group, valid, weights, 0.5, mode="plain")
    torch.testing.assert_close(plain, torch.tensor(0.25 * (0.4 + 0.75) + 2.0 * (2.0 + 2.0)))


def test_a_level_missing_from_the_batch_contributes_nothing(actor):
    batch = two_level_batch(actor)
    hand = replay(actor, batch)
    labels = batch["expert_action"]
    # a third level that this batch does not hold: same loss as with two levels, no NaN
    three = ImitationLoss(actor, alpha=ALPHA, epsilon=EPS, cost_scaling="per_level", num_levels=3)
    out = three(batch)
    expected = per_level_by_hand(hand["logits"], labels, batch["level"], hand["routing", "cost"], 3)
    torch.testing.assert_close(total_loss(out), expected)
    two = ImitationLoss(actor, alpha=ALPHA, epsilon=EPS, cost_scaling="per_level", num_levels=2)
    torch.testing.assert_close(total_loss(out), total_loss(two(batch)))
    total_loss(out).backward()
    grads = [p.grad for p in actor.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # only level 1 in the batch; level 0's NaN at its (invalid) steps stays out too
    step_loss = torch.tensor([float("nan"), 1.0, 2.0])
    cost = torch.tensor([float("inf"), 2.0, 4.0], requires_grad=True)
    group = torch.tensor([0, 1, 1])
    valid = torch.tensor([False, True, True])
    out = grouped_routing_cost_loss(step_loss, cost, group, valid, torch.ones(2), 0.5, 1.0)
    torch.testing.assert_close(out, torch.tensor(1.5 + 0.5 * 3.0 / 2.5))
    (grad,) = torch.autograd.grad(out, cost)
    assert torch.isfinite(grad).all() and grad[0] == 0


def test_each_level_pulls_its_own_steps_through_its_own_term():
    torch.manual_seed(0)
    step_loss = torch.rand(12, requires_grad=True)
    cost = torch.rand(12, requires_grad=True)
    group = torch.tensor([0, 1] * 6)
    valid = torch.ones(12, dtype=torch.bool)
    valid[3] = False

    def term(k):  # level k's term alone
        weights = torch.zeros(2).index_fill(0, torch.tensor([k]), 1.0)
        return grouped_routing_cost_loss(step_loss, cost, group, valid, weights, 0.3, 0.1)

    for k in (0, 1):
        d_loss, d_cost = torch.autograd.grad(term(k), (step_loss, cost))
        mine = (group == k) & valid
        assert (d_cost[~mine] == 0).all() and (d_loss[~mine] == 0).all()
        assert (d_cost[mine] > 0).all()
    # with step shares as weights every step's cost is pulled by α / (N (ε + L_k)) of its level
    counts = torch.bincount(group[valid], minlength=2).float()
    total = grouped_routing_cost_loss(
        step_loss, cost, group, valid, counts / counts.sum(), 0.3, 0.1
    )
    (d_cost,) = torch.autograd.grad(total, cost)
    level_loss = torch.stack([step_loss[valid & (group == k)].mean() for k in (0, 1)]).detach()
    expected = torch.where(valid, 0.3 / (valid.sum() * (0.1 + level_loss[group])), 0.0)
    torch.testing.assert_close(d_cost, expected)


def test_gradients_reach_each_levels_routers(actor):
    """The routers get a gradient from the routing term of each level alone (the batch holds
    one level at a time): each level's own term reaches them."""
    batch = two_level_batch(actor)
    routers = [p for n, p in actor.named_parameters() if "router" in n]
    assert routers
    for k in (0, 1):
        only = batch.clone()
        only["level"] = torch.full_like(batch["level"], k)
        out = ImitationLoss(
            actor, alpha=ALPHA, epsilon=EPS, cost_scaling="per_level", num_levels=2
        )(only)
        grads = torch.autograd.grad(out["loss_routing"], routers, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_single_level_run_keeps_the_batch_form_exactly(actor, tiny_config):
    config = tiny_config()
    assert config.levels == ["BabyAI-GoToRedBall-v0"] and config.cost_scaling == "batch"
    assert tiny_config(task_id=LEVELS).cost_scaling == "per_level"
    assert tiny_config(task_id=LEVELS, cost_scaling="batch").cost_scaling == "batch"
    with pytest.raises(ConfigError, match=r"'cost_scaling'.*several levels"):
        tiny_config(cost_scaling="per_level")
    batch = make_batch(actor)
    built = ImitationLoss(
        actor,
        alpha=ALPHA,
        epsilon=EPS,
        cost_scaling=config.cost_scaling,
        num_levels=len(config.levels),
    )(batch)
    hand = replay(actor, batch)
    valid = batch["expert_action"] >= 0
    task = F.cross_entropy(hand["logits"][valid], batch["expert_action"][valid])
    before = routing_cost_loss(task, hand["routing", "cost"], ALPHA, EPS)  # the form so far
    assert torch.equal(built["loss_imitation"], task)
    assert torch.equal(built["loss_routing"], before - task)
    # and the per-level form over one level with every step labelled is the batch form
    batch["expert_action"] = batch["expert_action"].clamp(min=0)
    batch["level"] = torch.zeros(batch.shape, dtype=torch.long)
    one = ImitationLoss(actor, alpha=ALPHA, epsilon=EPS, cost_scaling="per_level", num_levels=1)
    torch.testing.assert_close(
        total_loss(one(batch)), total_loss(ImitationLoss(actor, alpha=ALPHA, epsilon=EPS)(batch))
    )


def test_scaled_forms_refuse_a_task_loss_that_is_not_a_performance_measure():
    cost = torch.tensor([1.0, 2.0])
    # a cross-entropy rounds to exactly 0 when every label has a large margin: still finite
    torch.testing.assert_close(
        routing_cost_loss(torch.tensor(0.0), cost, alpha=0.1, epsilon=0.5), torch.tensor(0.3)
    )
    for bad in (-0.3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"must be non-negative and finite .*got {bad:g}"):
            routing_cost_loss(torch.tensor(bad), cost, alpha=0.1)
        with pytest.raises(ValueError, match=f"of group 1, .*got {bad:g}"):
            grouped_routing_cost_loss(
                torch.tensor([0.5, bad]), cost, torch.tensor([0, 1]), torch.ones(2, dtype=bool),
                torch.ones(2), 0.1,
            )  # fmt: skip
        # the plain form and α = 0 take any loss (an RL objective goes negative)
        routing_cost_loss(torch.tensor(bad), cost, alpha=0.1, mode="plain")
        routing_cost_loss(torch.tensor(bad), cost, alpha=0.0)
    with pytest.raises(ValueError) as err:
        routing_cost_loss(torch.tensor(-1.0), cost, 1)
    assert "\n" not in str(err.value) and "mode='plain'" in str(err.value)
    with pytest.raises(ValueError, match="mode must be"):
        routing_cost_loss(torch.tensor(1.0), cost, 0.0, mode="scaeld")
    with pytest.raises(ValueError, match="num_levels"):
        ImitationLoss(torch.nn.Identity(), cost_scaling="per_level")


def test_a_nan_cross_entropy_is_left_for_the_loop_to_report(actor):
    """A diverged policy's NaN reaches the loop's NonFiniteLossError (which keeps the last
    checkpoint), not the scaled form's ValueError."""
    batch = two_level_batch(actor)
    for p in actor.parameters():
        p.data.fill_(float("nan"))
    for scaling, levels in (("batch", None), ("per_level", 2)):
        out = ImitationLoss(actor, alpha=ALPHA, cost_scaling=scaling, num_levels=levels)(batch)
        assert torch.isnan(total_loss(out))


@pytest.mark.slow
def test_two_level_training_runs_per_level_and_an_old_run_resumes_in_batch_form(tiny_config):
    run_dir = train(tiny_config(task_id=LEVELS, num_updates=2, buffer_frames=32, batch_slices=2))
    payload = load_checkpoint(run_dir)
    assert payload["config"]["cost_scaling"] == "per_level"
    logged = (run_dir / "logs" / "scalars" / "train" / "loss_routing.csv").read_text().split()
    assert logged and all(math.isfinite(float(line.split(",")[-1])) for line in logged)
    for level in ("GoToRedBall", "GoToLocal"):  # each level's L_k and cost_k, logged
        for metric in ("loss", "routing_cost"):
            path = run_dir / "logs" / "scalars" / "train" / level / f"{metric}.csv"
            values = [float(line.split(",")[-1]) for line in path.read_text().split()]
            assert values and all(math.isfinite(v) and v > 0 for v in values), path

    # A run saved before cost_scaling existed trained in the batch form: it resumes in it
    old = run_dir.parent / "old"
    train(tiny_config(task_id=LEVELS, num_updates=1, cost_scaling="batch", run_name="old"))
    saved = yaml.safe_load((old / "config.yaml").read_text())
    del saved["cost_scaling"]
    (old / "config.yaml").write_text(yaml.safe_dump(saved))
    payload = load_checkpoint(old)
    del payload["config"]["cost_scaling"]
    save_checkpoint(old / "checkpoint.pt", {k: v for k, v in payload.items() if k != "format"})
    config = resume_config(old, {"num_updates": 2})
    assert config.cost_scaling == "batch"
    train(config, resume=True)
    assert load_checkpoint(old)["update"] == 2
    assert load_actor(old)[1].cost_scaling == "batch"


def test_v0_2_checkpoint_of_two_levels_reads_as_the_batch_form(tmp_path):
    """tests/data/checkpoint_v0.2.pt (saved before cost_scaling existed; a flat config) with
    its task_id made two levels: it reads as what it trained with, the batch form."""
    import pathlib

    payload = load_checkpoint(pathlib.Path(__file__).parent / "data" / "checkpoint_v0.2.pt")
    assert "cost_scaling" not in payload["config"]
    payload["config"]["task_id"] = LEVELS
    save_checkpoint(tmp_path / "checkpoint.pt", {k: v for k, v in payload.items() if k != "format"})
    _, config = load_actor(tmp_path / "checkpoint.pt")
    assert len(config.levels) == 2 and config.cost_scaling == "batch"


# ----------------------------------------------------------------- the routing cost for RL
def test_rl_uses_the_plain_form_with_its_own_default_alpha(tiny_config):
    from test_losses import B, T

    from mop_torchrl.core.config import DEFAULT_ALPHA, DEFAULT_RL_ALPHA
    from mop_torchrl.train.losses import RoutingClipPPOLoss

    assert tiny_config(algo="ppo", num_envs=4).alpha == DEFAULT_RL_ALPHA
    assert tiny_config().alpha == DEFAULT_ALPHA
    assert tiny_config(algo="ppo", num_envs=4, alpha=0.3).alpha == 0.3
    assert TrainConfig.from_dict(tiny_config(algo="ppo", num_envs=4).to_dict()).alpha == (
        DEFAULT_RL_ALPHA
    )
    torch.manual_seed(0)
    actor, critic = make_policy("mop", **SMALL)
    actor.eval()
    batch = make_batch(actor)
    with torch.no_grad(), set_recurrent_mode(True):
        batch = actor(batch)
    batch["advantage"] = torch.randn(B, T, 1)
    batch["value_target"] = torch.randn(B, T, 1)
    loss = RoutingClipPPOLoss(actor, critic, entropy_coeff=10.0)  # a very negative total
    assert loss.alpha == DEFAULT_RL_ALPHA
    out = loss(batch.exclude("routing"))
    assert out["loss_objective"] + out["loss_critic"] + out["loss_entropy"] < 0
    hand = replay(actor, batch)
    torch.testing.assert_close(
        out["loss_routing"], DEFAULT_RL_ALPHA * hand["routing", "cost"].mean()
    )


@pytest.mark.parametrize("example", ["recurrent_ppo"])
def test_rl_examples_default_to_the_rl_alpha(example):
    from test_examples import load_example

    from mop_torchrl.core.config import DEFAULT_RL_ALPHA

    assert load_example(example).parse_args([]).alpha == DEFAULT_RL_ALPHA


@pytest.mark.slow
@pytest.mark.parametrize("example", ["recurrent_ppo_cartpole"])
def test_rl_examples_add_the_cost_in_the_plain_form(example, monkeypatch):
    from test_examples import SMOKE, load_example

    module = load_example(example.removesuffix("_cartpole"))
    calls = []

    def spy(loss, cost, alpha, epsilon=1e-2, mode="scaled"):
        calls.append((loss.item(), mode))
        return routing_cost_loss(loss, cost, alpha, epsilon, mode)

    monkeypatch.setattr(module, "routing_cost_loss", spy)
    result = module.main([*SMOKE[example], "--core", "mop"])
    assert calls and {mode for _, mode in calls} == {"plain"}
    assert all(math.isfinite(x) for x in result["losses"])
