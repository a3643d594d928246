"""Routing analysis: schema validation, mission types, summaries and plots (no env, no policy)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from synthetic import synthetic_tables

from mop_torchrl.analysis import (
    MISSION_TYPES,
    format_markdown,
    mission_type,
    plot_ablation,
    plot_all,
    plot_cost,
    plot_entropy,
    plot_spatial,
    plot_timeline,
    plot_utilisation,
    read_episodes,
    read_routes,
    routes_schema,
    step_event,
    summarise,
    validate_episodes,
    validate_routes,
    weight_columns,
    write_summary,
    write_tables,
)

LAYERS = [[0, 16, 32], [32, 64]]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    return synthetic_tables(
        LAYERS, levels=("BabyAI-GoToLocal-v0", "BabyAI-PickupLoc-v0"), episodes_per_level=3, seed=3
    )


@pytest.fixture(scope="module")
def ablation() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "setting": ["baseline", "threshold 0.1", "threshold 0.3", "no largest"],
            "threshold": [0.0, 0.1, 0.3, 0.0],
            "disable_largest": [False, False, False, True],
            "success_rate": [0.95, 0.93, 0.71, 0.40],
            "drop": [0.0, 0.02, 0.24, 0.55],
        }
    )


def tiny_table() -> pd.DataFrame:
    """Hand-computable: one block [0, 16], two levels, one episode each, two steps each."""
    return pd.DataFrame(
        {
            "level": ["A", "A", "B", "B"],
            "mission": ["go to the red ball"] * 2 + ["pick up a key"] * 2,
            "mission_type": ["go_to", "go_to", "pick_up", "pick_up"],
            "episode": [0, 0, 1, 1],
            "step": [0, 1, 0, 1],
            "agent_x": [1, 2, 1, 1],
            "agent_y": [1, 1, 1, 2],
            "direction": [0, 0, 1, 1],
            "carrying": [0, 0, 0, 1],
            "action": [2, 6, 3, 6],
            "expert_action": [2, 6, 3, -1],
            "w0_0": [0.9, 0.2, 0.6, 0.5],
            "w0_1": [0.1, 0.8, 0.4, 0.5],
            "cost": [1.0, 2.0, 3.0, 4.0],
            "event": ["", "goal_reached", "pickup", ""],
            "success": [1, 1, 0, 0],
            "episode_return": [0.97, 0.97, 0.0, 0.0],
            "episode_length": [2, 2, 2, 2],
        }
    )


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 1000, path


# --- schema -------------------------------------------------------------------------------------


def test_synthetic_table_is_valid(tables):
    routes, episodes = tables
    validate_routes(routes, LAYERS)
    validate_episodes(episodes)
    assert weight_columns(LAYERS) == ["w0_0", "w0_1", "w0_2", "w1_0", "w1_1"]
    assert set(routes["level"]) == {"BabyAI-GoToLocal-v0", "BabyAI-PickupLoc-v0"}
    assert routes["episode"].nunique() == 6 == len(episodes)
    lengths = routes.groupby("episode").size()
    assert (lengths == routes.groupby("episode")["episode_length"].first()).all()
    # the routing cost is Σ_l Σ_i p d² of the weights
    expected = sum(
        routes[f"w{b}_{i}"] * size**2
        for b, block in enumerate(LAYERS)
        for i, size in enumerate(block)
    )
    np.testing.assert_allclose(routes["cost"], expected, rtol=1e-9)


def test_csv_round_trip(tables, tmp_path):
    routes, episodes = tables
    routes.to_csv(tmp_path / "routes.csv", index=False)
    episodes.to_csv(tmp_path / "episodes.csv", index=False)
    back = read_routes(tmp_path / "routes.csv")
    validate_routes(back, LAYERS)
    pd.testing.assert_frame_equal(back, routes, check_dtype=False)
    validate_episodes(read_episodes(tmp_path / "episodes.csv"))


def test_parquet_round_trip_keeps_schema(tables, tmp_path):
    routes, episodes = tables
    paths = write_tables(tmp_path, routes=routes, episodes=episodes)
    assert [p.name for p in paths] == [
        "routes.csv",
        "routes.parquet",
        "episodes.csv",
        "episodes.parquet",
    ]
    back = read_routes(tmp_path / "routes.parquet")
    validate_routes(back, LAYERS)
    # column order, dtypes (int64, float64, object strings incl. the empty events) and values
    pd.testing.assert_frame_equal(back, routes, check_dtype=True)
    assert (back["event"] == "").any()
    pd.testing.assert_frame_equal(read_episodes(tmp_path / "episodes.parquet"), episodes)
    # the CSV twin holds the same rows
    pd.testing.assert_frame_equal(read_routes(tmp_path / "routes.csv"), routes, check_dtype=False)


def test_parquet_files_have_the_schema_types(tables, tmp_path):
    routes, episodes = tables
    write_tables(tmp_path, routes=routes, episodes=episodes)
    schema = routes_schema(LAYERS)
    stored = pq.read_table(tmp_path / "routes.parquet").select(schema.names)
    assert stored.cast(schema).schema.equals(schema)  # safe casts only (large_string -> string)


@pytest.mark.parametrize("column", ["mission_type", "episode", "w0_2", "w1_0", "cost", "event"])
def test_validate_missing_column(tables, column):
    routes = tables[0].drop(columns=[column])
    with pytest.raises(ValueError, match=column):
        validate_routes(routes, LAYERS)


def test_validate_weights_must_sum_to_one(tables):
    routes = tables[0].copy()
    routes.loc[5, "w1_0"] += 0.01
    with pytest.raises(ValueError, match=r"\['w1_0', 'w1_1'\] \(block 1\) must sum to 1"):
        validate_routes(routes, LAYERS)
    routes.loc[5, "w1_0"] -= 0.01 - 5e-5  # within the 1e-4 tolerance
    validate_routes(routes, LAYERS)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda df: df.assign(w2_0=1.0), "w2_0.*not in layers"),
        (lambda df: df.assign(mission_type="goto"), "unknown value.*goto"),
        (lambda df: df.assign(carrying=2), "'carrying' must be 0 or 1"),
        (lambda df: df.assign(expert_action=-2), "expert_action"),
        (lambda df: df.assign(cost=np.nan), "'cost' has missing values"),
        (lambda df: df.assign(cost=np.inf), "'cost' must hold finite numbers"),
        (lambda df: df.assign(w0_0=True), "'w0_0' must hold finite numbers"),
        (lambda df: df.assign(episode="0"), "'episode' must hold integers"),
        (lambda df: df.assign(step=1.5), "'step' must hold integers"),
        (lambda df: df.assign(level=3), "'level' must hold strings"),
        (lambda df: df.assign(step=0), "duplicate \\(episode, step\\)"),
        (lambda df: df.assign(success=np.arange(len(df)) % 2), "'success' must be constant"),
    ],
)
def test_validate_rejects(tables, edit, match):
    with pytest.raises(ValueError, match=match):
        validate_routes(edit(tables[0].copy()), LAYERS)


def test_validate_episodes_rejects(tables):
    episodes = tables[1]
    with pytest.raises(ValueError, match="frame_path"):
        validate_episodes(episodes.drop(columns=["frame_path"]))
    with pytest.raises(ValueError, match="JSON list"):
        validate_episodes(episodes.assign(objects="not json"))


@pytest.mark.parametrize(
    ("mission", "expected"),
    [
        ("go to the red ball", "go_to"),
        ("go to a purple door", "go_to"),
        ("pick up the green key on your left", "pick_up"),
        ("open the door", "open"),
        ("open a red door behind you", "open"),
        ("put the red key next to the blue ball", "put_next"),
        ("put the ball next to a box in front of you", "put_next"),
        ("pick up a box and go to the grey door", "pick_up"),
        ("open the yellow door, then put a key next to the ball", "open"),
        ("go to a box after you pick up the blue key", "go_to"),
        ("put a ball next to a key and open a door, then go to the box", "put_next"),
        ("  Go  to the RED ball ", "go_to"),
        ("get to the green goal square", "other"),
        ("", "other"),
    ],
)
def test_mission_type(mission, expected):
    assert mission_type(mission) == expected
    assert expected in MISSION_TYPES


def test_mission_type_temporal():
    mission = "open a door and go to the ball after you pick up a key and put a box next to a key"
    assert mission_type(mission) == "open"
    assert mission_type(mission, temporal=True) == "pick_up"
    assert mission_type("go to the box, then open a door", temporal=True) == "go_to"


def test_step_event():
    assert step_event(2, False, False) == ""
    assert step_event(3, False, True) == "pickup"
    assert step_event(3, True, True) == ""
    assert step_event(4, True, False) == "drop"
    assert step_event(5, False, False, door_changed=True) == "toggle_door"
    assert step_event(5, False, False) == ""
    assert step_event(2, False, False, success=True) == "goal_reached"
    assert step_event(3, False, True, success=True) == "pickup+goal_reached"


# --- summaries ----------------------------------------------------------------------------------


def test_summaries_on_tiny_table():
    layers = [[0, 16]]
    df = tiny_table()
    validate_routes(df, layers)
    out = summarise(df, layers)

    util = out["utilisation"].set_index(["level", "mission_type", "expert"])
    # argmax per step: 0, 1, 0, 0 (the 0.5/0.5 tie goes to expert 0)
    assert util.loc[("all", "all", 0), "argmax_share"] == pytest.approx(0.75)
    assert util.loc[("all", "all", 1), "argmax_share"] == pytest.approx(0.25)
    assert util.loc[("all", "all", 0), "mean_weight"] == pytest.approx(0.55)
    assert util.loc[("A", "all", 0), "argmax_share"] == pytest.approx(0.5)
    assert util.loc[("B", "all", 0), "argmax_share"] == pytest.approx(1.0)
    assert util.loc[("all", "pick_up", 1), "mean_weight"] == pytest.approx(0.45)
    assert util.loc[("A", "go_to", 1), "size"] == 16
    assert util.loc[("all", "all", 0), "n_steps"] == 4

    ent = out["entropy"].set_index(["level", "mission_type"])

    def h(*p):
        return -sum(x * math.log(x) for x in p)

    assert ent.loc[("all", "all"), "mean_entropy"] == pytest.approx(
        (h(0.9, 0.1) + h(0.2, 0.8) + h(0.6, 0.4) + h(0.5, 0.5)) / 4
    )
    assert ent.loc[("all", "all"), "entropy_of_mean"] == pytest.approx(h(0.55, 0.45))
    assert ent.loc[("B", "all"), "entropy_of_mean"] == pytest.approx(h(0.55, 0.45))
    assert ent.loc[("all", "all"), "max_entropy"] == pytest.approx(math.log(2))

    cost = out["cost"].set_index(["level", "mission_type"])
    assert cost.loc[("all", "all"), "mean_cost"] == pytest.approx(2.5)
    assert cost.loc[("A", "all"), "mean_cost"] == pytest.approx(1.5)
    assert cost.loc[("all", "pick_up"), "mean_cost"] == pytest.approx(3.5)
    assert cost.loc[("B", "pick_up"), "std_cost"] == pytest.approx(0.5)
    assert cost.loc[("all", "all"), "success_rate"] == pytest.approx(0.5)
    assert cost.loc[("all", "all"), "n_episodes"] == 2
    # groups: all, 2 levels, 2 mission types, 2 level x mission type pairs
    assert len(cost) == 7


def test_summary_groups_and_writer(tables, tmp_path):
    routes, _ = tables
    out = summarise(routes, LAYERS)
    util = out["utilisation"]
    overall = util[(util["level"] == "all") & (util["mission_type"] == "all")]
    assert len(overall) == 5
    sums = overall.groupby("block")[["mean_weight", "argmax_share"]].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0)
    paths = write_summary(out, tmp_path / "summary")
    assert [p.name for p in paths] == ["utilisation.csv", "entropy.csv", "cost.csv", "summary.md"]
    back = pd.read_csv(paths[2])
    pd.testing.assert_frame_equal(back, out["cost"], check_dtype=False)
    text = paths[-1].read_text()
    assert "## entropy" in text and "| level | mission_type |" in text
    assert format_markdown(pd.DataFrame({"a|b": ["x|y"]})).splitlines()[-1] == "| x\\|y |"


# --- plots --------------------------------------------------------------------------------------


def test_plot_functions(tables, ablation, tmp_path):
    routes, _ = tables
    first = int(routes["episode"].iloc[0])
    paths = [
        plot_spatial(routes, LAYERS, tmp_path / "spatial.png", grid_size=(8, 8), title="pooled"),
        plot_timeline(routes, LAYERS, tmp_path / "timeline.png", episode=first),
        plot_utilisation(routes, LAYERS, tmp_path / "util.png", by="mission_type"),
        plot_entropy(routes, LAYERS, tmp_path / "entropy.png"),
        plot_cost(routes, tmp_path / "cost.png"),
        plot_ablation(ablation, tmp_path / "sub" / "ablation.png"),
    ]
    for path in paths:
        assert_png(path)
    # drawn over a rendered frame (an RGB array of the whole grid)
    frame = np.random.default_rng(0).integers(0, 255, (8 * 16, 8 * 16, 3), dtype=np.uint8)
    one = routes[routes["episode"] == first]
    assert_png(plot_spatial(one, LAYERS, tmp_path / "bg.png", grid_size=(8, 8), background=frame))
    # a long episode draws actions as markers instead of tick labels
    long = pd.concat([one.assign(step=one["step"] + k * len(one)) for k in range(5)])
    assert_png(plot_timeline(long, LAYERS, tmp_path / "long.png"))


def test_plot_errors(tables, ablation, tmp_path):
    routes, _ = tables
    with pytest.raises(ValueError, match="episode 999"):
        plot_timeline(routes, LAYERS, tmp_path / "x.png", episode=999)
    with pytest.raises(ValueError, match="'drop'"):
        plot_ablation(ablation.drop(columns=["drop"]), tmp_path / "x.png")
    with pytest.raises(ValueError, match="by must be"):
        plot_utilisation(routes, LAYERS, tmp_path / "x.png", by="episode")


def test_plot_all(tables, ablation, tmp_path):
    routes, episodes = tables
    frame_path = tmp_path / "frame0.png"
    import matplotlib.image as mpimg

    mpimg.imsave(frame_path, np.full((64, 64, 3), 0.2))
    episodes = episodes.assign(frame_path=["frame0.png"] + [""] * (len(episodes) - 1))
    paths = plot_all(
        routes,
        episodes,
        LAYERS,
        tmp_path / "plots",
        ablation_df=ablation,
        max_episodes=2,
        frames_root=tmp_path,
    )
    names = {p.name for p in paths}
    assert {"cost.png", "ablation.png", "spatial_GoToLocal.png", "spatial_PickupLoc.png"} <= names
    assert {"timeline_ep0.png", "spatial_ep1.png", "utilisation_mission_type.png"} <= names
    assert len(paths) == 4 + 1 + 2 + 2 * 2 + 1
    for path in paths:
        assert_png(path)
