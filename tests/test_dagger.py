"""DAgger on a TorchRL replay buffer, the grounding probe and the normalised routing cost."""

import pytest
import torch
from console import cli
from tensordict import TensorDict
from tensordict.nn import TensorDictModuleBase
from tiny import tiny_settings
from torchrl.collectors import Collector
from torchrl.modules import set_recurrent_mode

from mop_torchrl import MoPConfig
from mop_torchrl.babyai.envs import make_babyai_env
from mop_torchrl.babyai.policy import make_policy, policy_parts
from mop_torchrl.core.model import MoPCore
from mop_torchrl.train.checkpoint import load_checkpoint
from mop_torchrl.train.dagger import BotMixer, DaggerDataset
from mop_torchrl.train.evaluate import bot_episodes, grounding_probe
from mop_torchrl.train.losses import ImitationLoss

SMALL_MOP = MoPConfig.from_preset("seed", layers="0,8;8,16", intermediate_dim=16, router_dim=8)


@pytest.fixture(scope="module")
def collected():
    """A real collector batch [4 envs, 16 steps] of a small MoP student, with bot labels."""
    torch.manual_seed(0)
    actor, _ = make_policy("mop", mop=SMALL_MOP)
    actor.eval()
    env = make_babyai_env("GoToRedBall", num_envs=4, seed=1, expert=True, parallel=False)
    collector = Collector(
        env, actor, frames_per_batch=64, total_frames=128, auto_register_policy_transforms=True
    )
    batches = [b.reshape(4, 16) for b in collector]
    collector.shutdown()
    return actor, batches


def test_training_path_ratio_is_opt_in_and_does_not_change_the_data(tiny_config):
    """The bot's solution length is measured on a deep copy of each env: with it or without it,
    the collected batches are the same, key for key."""
    from mop_torchrl.train.collection import segment_batches
    from mop_torchrl.train.policy import build_policy

    batches = {}
    for measured in (False, True):
        config = tiny_config(num_updates=2, train_path_ratio=measured)
        torch.manual_seed(0)
        actor = build_policy(config)[0]
        batches[measured] = [batch for _, batch in segment_batches(actor, config, 0, expert=True)]
    for plain, measured in zip(batches[False], batches[True], strict=True):
        assert ("next", "bot_solution_length") not in plain.keys(True)
        assert (measured["next", "bot_solution_length"] > 0).any()
        lengths = ["bot_solution_length", ("next", "bot_solution_length")]
        assert (plain == measured.exclude(*lengths)).all()


@pytest.mark.parametrize("burn_in", [0, 4])
def test_replayed_slices_reproduce_collection_outputs(collected, burn_in):
    actor, batches = collected
    dataset = DaggerDataset(
        [*actor.in_keys, "logits"],
        frames=128,
        slice_len=16 - burn_in,
        burn_in=burn_in,
        batch_slices=6,
    )
    for batch in batches:
        dataset.extend(batch)
    sample = dataset.sample()
    assert sample.shape == (6, 16)
    assert sample["is_init"][:, 0].all()
    if burn_in:
        assert (sample["expert_action"][:, :burn_in] == -1).all()
    stored = sample["logits"].clone()
    with set_recurrent_mode(True), torch.no_grad():
        replayed = policy_parts(actor).logits(sample.exclude("logits"))["logits"]
    torch.testing.assert_close(replayed, stored, atol=1e-5, rtol=1e-5)


def test_capacity_evicts_the_oldest_segments(collected):
    actor, batches = collected
    dataset = DaggerDataset(actor.in_keys, frames=96, slice_len=16, batch_slices=2)
    for batch in [*batches, batches[0]]:  # 3 × 64 frames into 96
        dataset.extend(batch)
    assert len(dataset) == 96
    segments = dataset.buffer.storage[:96]["segment"].unique().tolist()
    assert segments == [6, 7, 8, 9, 10, 11]  # batch 0's four rows and two of batch 1's are gone
    assert dataset.sample().shape == (2, 16)


def test_labels_of_minus_one_are_ignored(collected):
    actor, batches = collected
    data = batches[0].clone()
    data["expert_action"][:, ::2] = -1
    loss = ImitationLoss(actor, alpha=0.0)(data)["loss_imitation"]
    with set_recurrent_mode(True), torch.no_grad():
        logits = policy_parts(actor).logits(data.copy())["logits"]
    valid = data["expert_action"] >= 0
    expected = torch.nn.functional.cross_entropy(logits[valid], data["expert_action"][valid])
    torch.testing.assert_close(loss.detach(), expected, atol=1e-6, rtol=1e-6)


def test_bot_mixer_follows_beta():
    torch.manual_seed(0)
    td = TensorDict(
        action=torch.zeros(4000, dtype=torch.long),
        expert_action=torch.ones(4000, dtype=torch.long),
        batch_size=[4000],
    )
    share = BotMixer(beta=0.3)(td)["action"].float().mean().item()
    assert abs(share - 0.3) < 0.03


TINY = tiny_settings(
    buffer_frames=64,
    updates_per_batch=2,
    batch_slices=3,
    slice_len=6,
    burn_in=2,
    checkpoint_interval=2,
)


def _cli(*args: str) -> None:
    result = cli("train", *args)
    assert result.returncode == 0, result.stderr


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["--collection=overlap", "--lr_decay_updates=6"],
        # bfloat16 updates: rounded, but the same rounding in a fresh process
        [
            "--collection=overlap",
            "--student_action=sample",
            "--dagger_beta=0.5",
            "--autocast=bfloat16",
        ],
        [],  # sync collection, the default
    ],
    ids=["overlap-lr-decay", "overlap-sample-beta-bf16", "sync"],
)
def test_resume_with_a_non_empty_buffer_is_exact_in_a_fresh_process(tmp_path, extra):
    flags = [f"--{k}={v}" for k, v in TINY.items()] + [f"--run_dir={tmp_path}", *extra]
    _cli(*flags, "--num_updates=4", "--run_name=straight")
    _cli(*flags, "--num_updates=2", "--run_name=resumed")
    saved = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert saved["buffers"] == {"dagger": "buffers/dagger-00000002"}
    _cli("--resume", str(tmp_path / "resumed"), "--num_updates=4")
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    for name, value in straight["model"]["actor"].items():
        torch.testing.assert_close(resumed["model"]["actor"][name], value, rtol=0, atol=0)
    assert [p.name for p in (tmp_path / "resumed" / "buffers").iterdir()] == ["dagger-00000004"]
    # The learning rate of the last update (3): decayed linearly over 6 updates, or constant.
    lr = 1e-3 * (1 - 3 / 6) if "--lr_decay_updates=6" in extra else 1e-3
    for run in (straight, resumed):
        assert run["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr)


class MissionLookup(TensorDictModuleBase):
    """A policy that reads only the mission (and the time step): it replays the bot's labels
    it memorised per mission. With another episode's mission it acts on that one's labels."""

    def __init__(self, episodes) -> None:
        super().__init__()
        self.in_keys = ["mission", "is_init"]
        self.out_keys = ["action"]
        self.table = {
            tuple(row["mission"][0].tolist()): row["expert_action"] for row in episodes.unbind(0)
        }

    def forward(self, td):
        rows = [
            self.table.get(tuple(m[0].tolist()), torch.zeros(td.shape[1], dtype=torch.long))
            for m in td["mission"]
        ]
        td["action"] = torch.stack(rows)
        return td


def test_grounding_probe_tells_a_mission_reader_from_a_mission_blind_policy():
    episodes = bot_episodes("GoToLocal", episodes=8, seed=0)
    assert episodes["mask"].any(-1).all()
    reader = grounding_probe(MissionLookup(episodes), episodes)
    assert reader["label_accuracy"] > 0.85  # < 1 only where two episodes share a mission
    assert reader["grounding_gap"] > 0.3

    blind = MissionLookup(episodes)
    zeroed = episodes.clone()
    zeroed["mission"].zero_()
    blind.table = {tuple(zeroed["mission"][0, 0].tolist()): episodes["expert_action"][0]}
    result = grounding_probe(_ZeroMission(blind), episodes)
    assert result["grounding_gap"] == 0.0


class _ZeroMission(TensorDictModuleBase):
    def __init__(self, inner) -> None:
        super().__init__()
        self.in_keys = ["mission", "is_init"]
        self.out_keys = ["action"]
        self.inner = inner

    def forward(self, td):
        td["mission"] = torch.zeros_like(td["mission"])
        return self.inner(td)


def test_grounding_probe_runs_on_both_cores():
    episodes = bot_episodes("GoToRedBall", episodes=3, seed=1)
    # Cut after the longest first episode: every row's mask is a prefix ending in a done step.
    mask = episodes["mask"]
    assert mask[:, -1].any() and (mask.cummin(-1).values == mask).all()
    assert (episodes["next", "done"].squeeze(-1) & mask).sum(-1).eq(1).all()
    single = bot_episodes("GoToRedBall", episodes=1, seed=1)  # an unbatched env underneath
    assert single.batch_dims == 2 and single.shape[0] == 1 and single["mask"][0, -1]
    padded = torch.cat([episodes, episodes[:, -1:].expand(3, 5).clone()], 1)
    padded["mask"][:, -5:] = False
    for kind in ("mop", "gru"):
        actor, _ = make_policy(kind, mop=SMALL_MOP, gru_hidden_size=16)
        result = grounding_probe(actor.eval(), episodes)
        assert 0 <= result["label_accuracy"] <= 1
        assert grounding_probe(actor, padded) == result  # what follows the episodes is not read


@pytest.mark.parametrize("preset", ["seed", "paper"])
def test_normalised_cost_gives_every_preset_the_same_scale(preset):
    config = MoPConfig.from_preset(preset, input_dim=8)
    core = MoPCore(config)
    for block in core.blocks:
        assert block.expert_cost.max().item() == 1.0  # the largest expert costs 1 per block
    raw = MoPCore(MoPConfig.from_preset(preset, input_dim=8, cost_norm="none"))
    for block, sizes in zip(raw.blocks, config.layers):
        assert block.expert_cost.tolist() == [float(d) ** 2 for d in sizes]
    # Uniform routing: cost = Σ_blocks mean_i (d_i / d_max)^2, in [0, num_blocks].
    x = torch.randn(3, 5, 8)
    out = core(x, [[torch.zeros(3, h) for h in b.state_sizes] for b in core.blocks])
    assert (out.cost >= 0).all() and (out.cost <= config.num_blocks).all()
