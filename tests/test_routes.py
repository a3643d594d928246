"""Routing recorder, ablation sweep and ``mop-torchrl routes`` on real BabyAI levels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tensordict.nn import TensorDictModule, TensorDictSequential
from tiny import tiny_settings

from mop_torchrl.analysis import (
    read_episodes,
    read_routes,
    validate_episodes,
    validate_routes,
    weight_columns,
)
from mop_torchrl.analysis.record import record_routes, sweep_ablation
from mop_torchrl.babyai.policy import make_policy
from mop_torchrl.cli import main
from mop_torchrl.core.config import MoPConfig
from mop_torchrl.train.checkpoint import save_checkpoint
from mop_torchrl.train.config import TrainConfig
from mop_torchrl.train.policy import build_policy

LAYERS = [[0, 8], [8, 16]]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _tiny_actor():
    torch.manual_seed(0)
    actor, _ = make_policy(
        "mop", mop=MoPConfig(layers="0,8;8,16", intermediate_dim=16, router_dim=8)
    )
    return actor


def _bot_actor(actor):
    """The MoP actor (for routing) whose action is replaced by the bot's label."""
    return TensorDictSequential(
        actor, TensorDictModule(lambda a: a.clone(), ["expert_action"], ["action"])
    )


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    out = tmp_path_factory.mktemp("record")
    routes, episodes = record_routes(_tiny_actor(), "GoToRedBall", episodes=3, seed=0, out_dir=out)
    return routes, episodes, out


def test_record_one_row_per_step(recording):
    routes, episodes, _ = recording
    validate_routes(routes, LAYERS)
    validate_episodes(episodes)
    lengths = routes.groupby("episode")["episode_length"].first()
    assert len(routes) == int(lengths.sum())
    assert (lengths <= 64).all()  # GoToRedBall's max_steps
    for _, rows in routes.groupby("episode"):
        assert rows["step"].tolist() == list(range(len(rows)))
    assert episodes["episode"].tolist() == [0, 1, 2]
    assert set(routes["level"]) == {"BabyAI-GoToRedBall-v0"}
    assert set(routes["mission_type"]) == {"go_to"}


def test_record_weights_positions_and_frames(recording):
    routes, episodes, out = recording
    for block in range(len(LAYERS)):
        cols = [f"w{block}_{i}" for i in range(len(LAYERS[block]))]
        np.testing.assert_allclose(routes[cols].sum(axis=1), 1.0, atol=1e-5)
    assert [c for c in routes.columns if c.startswith("w")] == weight_columns(LAYERS)
    grid = episodes.set_index("episode").loc[routes["episode"]]
    assert (
        (routes["agent_x"].to_numpy() > 0) & (routes["agent_x"] < grid["grid_width"].to_numpy() - 1)
    ).all()
    assert (
        (routes["agent_y"].to_numpy() > 0)
        & (routes["agent_y"] < grid["grid_height"].to_numpy() - 1)
    ).all()
    assert routes["direction"].between(0, 3).all() and routes["action"].between(0, 6).all()
    assert routes["expert_action"].between(-1, 6).all() and (routes["cost"] > 0).all()
    objects = json.loads(episodes["objects"].iloc[0])
    assert any(o["type"] == "ball" and o["color"] == "red" for o in objects)
    for frame in episodes["frame_path"]:
        data = (out / frame).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 500
    pd.testing.assert_frame_equal(read_routes(out / "routes.csv"), routes, check_dtype=False)
    pd.testing.assert_frame_equal(read_episodes(out / "episodes.csv"), episodes, check_dtype=False)
    pd.testing.assert_frame_equal(read_routes(out / "routes.parquet"), routes)  # types kept
    pd.testing.assert_frame_equal(read_episodes(out / "episodes.parquet"), episodes)


def test_record_events_with_bot_actions():
    """Acting with the bot's labels solves UnlockLocal: pickup, then toggle_door + goal."""
    routes, episodes = record_routes(_bot_actor(_tiny_actor()), "UnlockLocal", episodes=1)
    validate_routes(routes, LAYERS)
    assert routes["success"].iloc[0] == 1 and routes["episode_return"].iloc[0] > 0
    assert (routes["action"] == routes["expert_action"]).all()
    assert routes.loc[routes["event"] != "", "event"].tolist() == [
        "pickup",
        "toggle_door+goal_reached",
    ]
    pickup = routes.index[routes["event"] == "pickup"][0]
    assert routes.loc[pickup, "carrying"] == 0 and routes.loc[pickup + 1, "carrying"] == 1
    assert episodes["frame_path"].tolist() == [""]
    assert (episodes[["start_room_x", "start_room_y"]] >= 0).all(axis=None)


def test_record_restores_mode_and_knobs():
    actor = _tiny_actor().train()
    core = next(m for m in actor.modules() if hasattr(m, "set_inference_knobs"))
    routes, _ = record_routes(
        actor, "GoToRedBall", 1, weight_threshold=0.6, disable_largest=True, max_steps=4
    )
    assert len(routes) == 4
    # the largest expert (index 1) of each 2-expert block is off: all weight on expert 0
    np.testing.assert_allclose(routes[["w0_0", "w1_0"]], 1.0, atol=1e-6)
    np.testing.assert_allclose(routes[["w0_1", "w1_1"]], 0.0, atol=1e-6)
    assert actor.training
    assert all(b.weight_threshold == 0.0 and not b.disable_largest for b in core.core.blocks)


def test_record_rejects_gru():
    actor, _ = make_policy("gru", gru_hidden_size=16)
    with pytest.raises(ValueError, match="MoP"):
        record_routes(actor, "GoToRedBall", episodes=1)
    with pytest.raises(ValueError, match="MoP"):
        sweep_ablation(actor, "GoToRedBall", episodes=1)


def test_sweep_ablation_table():
    actor = _tiny_actor()
    table = sweep_ablation(actor, "GoToRedBall", episodes=2, thresholds=(0.0, 0.3), num_envs=2)
    assert table["setting"].tolist() == [
        "baseline",
        "no_largest",
        "threshold=0.3",
        "threshold=0.3+no_largest",
    ]
    for col in ("threshold", "disable_largest", "success_rate", "drop", "mean_cost"):
        assert col in table.columns
    np.testing.assert_allclose(table["drop"], table["success_rate"].iloc[0] - table["success_rate"])
    assert table["drop"].iloc[0] == 0.0 and (table["mean_cost"] > 0).all()
    core = next(m for m in actor.modules() if hasattr(m, "set_inference_knobs"))
    assert all(b.weight_threshold == 0.0 and not b.disable_largest for b in core.core.blocks)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A fresh tiny MoP policy saved the way ``Run.save`` does."""
    config = TrainConfig.from_dict(tiny_settings(task_id="BabyAI-GoToRedBall-v0"))
    actor, critic = build_policy(config)
    params = {id(p): p for m in (actor, critic) for p in m.parameters()}
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    return save_checkpoint(
        path,
        {
            "config": config.to_dict(),
            "model": {"actor": actor.state_dict(), "critic": critic.state_dict()},
            "optimizer": torch.optim.Adam(params.values()).state_dict(),
            "update": 0,
            "frames": 0,
            "extra": {},
        },
    )


def test_cli_routes_end_to_end(checkpoint, tmp_path, capsys):
    out = tmp_path / "routes"
    main(["routes", "--checkpoint", str(checkpoint), "--episodes", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "recorded 2 episodes" in printed and str(out) in printed
    routes, episodes = read_routes(out / "routes.csv"), read_episodes(out / "episodes.csv")
    validate_routes(routes, LAYERS)
    validate_episodes(episodes)
    for name in ("utilisation.csv", "entropy.csv", "cost.csv", "summary.md"):
        assert (out / "summary" / name).stat().st_size > 0
    pngs = sorted((out / "plots").glob("*.png"))
    assert {p.name for p in pngs} >= {"cost.png", "spatial_GoToRedBall.png", "timeline_ep0.png"}
    assert all(p.read_bytes().startswith(PNG_SIGNATURE) and p.stat().st_size > 1000 for p in pngs)
    assert len(list((out / "frames").glob("ep*.png"))) == 2
    assert not (out / "ablation.csv").exists()


def test_cli_routes_sweep(checkpoint, tmp_path):
    out = tmp_path / "sweep"
    main(
        [
            "routes",
            "--checkpoint",
            str(checkpoint),
            "--episodes",
            "1",
            "--out",
            str(out),
            "--level",
            "GoToLocal",
            "--sweep",
            "--sweep-thresholds",
            "0",
        ]
    )
    ablation = pd.read_csv(out / "ablation.csv")
    assert ablation["setting"].tolist() == ["baseline", "no_largest"]
    assert set(read_routes(out / "routes.csv")["level"]) == {"BabyAI-GoToLocal-v0"}
    assert (out / "plots" / "ablation.png").stat().st_size > 1000
