"""The pathway sweep's analysis on hand-computable routes tables: cost over successful episodes,
step-0 cost, measured difficulty, Spearman ρ per run with its bootstrap interval, seed means."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from mop_torchrl.analysis.pathways import (
    bootstrap_rho,
    level_summary,
    measured_difficulty,
    plot_cost_vs_difficulty,
    plot_success_vs_alpha,
    plot_usage,
    seed_aggregate,
    spearman_by_alpha,
    spearman_by_seed,
    usage_table,
    validate_summary,
)
from mop_torchrl.babyai.levels import LEVEL_DIFFICULTY


def routes_of(levels: dict[str, list[tuple[int, list[float]]]]) -> pd.DataFrame:
    """A routes table from ``{level: [(success, [cost of each step]), ...]}`` (episode ids run
    on across levels, as ``record_routes`` numbers them)."""
    rows, episode = [], 0
    for level, episodes in levels.items():
        for success, costs in episodes:
            for step, cost in enumerate(costs):
                rows.append((f"BabyAI-{level}-v0", episode, step, success, cost))
            episode += 1
    return pd.DataFrame(rows, columns=["level", "episode", "step", "success", "cost"])


def constant_levels(costs: dict[str, float], failed_cost: float = 50.0) -> pd.DataFrame:
    """Per level: nine successful episodes of 1-3 steps all costing ``costs[level]`` per step,
    and one failed 8-step episode costing ``failed_cost`` per step."""
    return routes_of(
        {
            level: [(1, [cost] * (1 + i % 3)) for i in range(9)] + [(0, [failed_cost] * 8)]
            for level, cost in costs.items()
        }
    )


# costs over successful episodes: [1, 4, 2, 3]; against the SPEC ranks [2, 3, 4, 5] ρ = 0.4;
# against the measured difficulty below ([3, inf, 4, 5]: GoToLocal not reached) ρ = 1.
COSTS = {"GoToRedBall": 1.0, "GoToLocal": 4.0, "PickupLoc": 2.0, "PutNextLocal": 3.0}
TABLE = {
    "GoToRedBall": {"frames": [1000.0], "median": 1000.0, "log10": 3.0},
    "GoToLocal": {"frames": [None, 50_000.0, None], "median": None, "log10": None},
    "PickupLoc": {"frames": [10_000.0], "median": 10_000.0, "log10": 4.0},
    "PutNextLocal": {"frames": [100_000.0], "median": 100_000.0, "log10": 5.0},
}


def write_difficulty(path, table=TABLE):
    path.write_text(json.dumps({"settings": {}, "runs": [], "table": table}))
    return path


def test_success_cost_leaves_failed_episodes_out_and_step0_cost_is_the_first_steps_mean():
    routes = routes_of(
        {
            # successful: 1 + 3 + 2 + 2 over 4 steps = 2.0; all steps: (8 + 10 + 20) / 6
            "GoToRedBall": [(1, [1.0, 3.0]), (1, [2.0, 2.0]), (0, [10.0, 20.0])],
            "GoToLocal": [(0, [5.0, 1.0]), (0, [7.0])],  # no success
        }
    )
    summary = level_summary(routes, alpha=0.1, seed=2)
    red, local = summary.to_dict("records")
    assert red["success"] == pytest.approx(2 / 3)
    assert red["cost_per_step_success"] == pytest.approx(2.0)
    assert red["cost_per_step"] == pytest.approx(38 / 6)
    assert red["step0_cost"] == pytest.approx((1 + 2 + 10) / 3)
    assert (red["episodes"], red["steps"], red["seed"]) == (3, 6, 2)
    assert local["success"] == 0 and math.isnan(local["cost_per_step_success"])
    assert local["step0_cost"] == pytest.approx(6.0)
    validate_summary(summary)  # NaN is allowed where nothing succeeded...
    with pytest.raises(ValueError, match="'cost_per_step_success'"):
        validate_summary(summary.assign(cost_per_step_success=float("nan")))  # ...only there
    with pytest.raises(ValueError, match="'seed'"):
        validate_summary(summary.assign(seed=0.5))
    with pytest.raises(ValueError, match="repeats"):
        validate_summary(pd.concat([summary, summary.iloc[:1]]))


def test_measured_difficulty_reads_log10_and_not_reached_is_infinite(tmp_path):
    difficulty = measured_difficulty(write_difficulty(tmp_path / "difficulty.json"))
    assert difficulty == {
        "GoToRedBall": 3.0,
        "GoToLocal": math.inf,
        "PickupLoc": 4.0,
        "PutNextLocal": 5.0,
    }
    (tmp_path / "bad.json").write_text(json.dumps({"runs": []}))
    with pytest.raises(ValueError, match="no 'table'"):
        measured_difficulty(tmp_path / "bad.json")


def test_rho_against_rank_and_measured_difficulty_with_a_level_not_reached(tmp_path):
    measures = {
        "spec_rank": LEVEL_DIFFICULTY,
        "log10_frames": measured_difficulty(write_difficulty(tmp_path / "d.json")),
    }
    draws = bootstrap_rho({(0.1, 0): constant_levels(COSTS)}, measures, resamples=50)
    table = spearman_by_seed(draws).set_index("measure")
    assert table.loc["spec_rank", "rho"] == pytest.approx(0.4)
    assert table.loc["log10_frames", "rho"] == pytest.approx(1.0)
    assert (table["levels"] == 4).all()
    # successful episodes all cost the same per step: every resample gives the same ρ, however
    # many of the (expensive) failed episodes it draws
    assert table["ci_low"].to_numpy() == pytest.approx(table["rho"].to_numpy())
    assert table["ci_high"].to_numpy() == pytest.approx(table["rho"].to_numpy())
    # the summary-level ρ agrees with the bootstrap's point estimate
    summary = level_summary(constant_levels(COSTS), alpha=0.1)
    by_alpha = spearman_by_alpha(summary, "cost_per_step_success", measures["log10_frames"])
    assert by_alpha["spearman_rho"].item() == pytest.approx(1.0)


def test_a_level_missing_from_the_json_or_without_success_is_left_out(tmp_path):
    table = {k: v for k, v in TABLE.items() if k != "PickupLoc"}
    measured = measured_difficulty(write_difficulty(tmp_path / "d.json", table))
    assert "PickupLoc" not in measured
    routes = constant_levels(COSTS)
    draws = bootstrap_rho({(0.0, 0): routes}, {"log10_frames": measured}, resamples=10)
    # left: GoToRedBall, GoToLocal, PutNextLocal; costs [1, 4, 3] vs [3, inf, 5]: ρ = 1
    row = spearman_by_seed(draws).iloc[0]
    assert (row["rho"], row["levels"]) == (pytest.approx(1.0), 3)
    # PickupLoc without a success: left out of the rank ρ (costs [1, 4, 3] vs [2, 3, 5])
    failing = routes[routes["level"] != "BabyAI-PickupLoc-v0"]
    failing = pd.concat([failing, routes_of({"PickupLoc": [(0, [2.0, 2.0])]})])
    row = spearman_by_seed(bootstrap_rho({(0.0, 0): failing}, {"r": LEVEL_DIFFICULTY}, 10))
    assert (row["rho"].item(), row["levels"].item()) == (pytest.approx(0.5), 3)


def noisy_routes(seed: int) -> pd.DataFrame:
    """20 episodes per level, cost per step drawn around a mean that grows with difficulty
    (with overlap), a fifth of the episodes failed."""
    rng = np.random.default_rng(seed)
    means = {"GoToRedBallNoDists": 1.0, "GoToRedBall": 1.3, "GoToLocal": 1.2, "PickupLoc": 1.6}
    return routes_of(
        {
            level: [
                (int(i % 5 != 0), list(mean + 0.4 * rng.standard_normal(int(rng.integers(2, 6)))))
                for i in range(20)
            ]
            for level, mean in means.items()
        }
    )


def test_bootstrap_interval_holds_the_point_estimate_and_is_deterministic_for_a_seed():
    runs = {(0.1, 0): noisy_routes(0), (0.1, 1): noisy_routes(1)}
    measures = {"spec_rank": LEVEL_DIFFICULTY}
    draws = bootstrap_rho(runs, measures, resamples=300, rng_seed=7)
    assert len(draws) == 2 * 301 and set(draws["draw"]) == set(range(301))
    table = spearman_by_seed(draws)
    assert (table["ci_low"] <= table["rho"]).all() and (table["rho"] <= table["ci_high"]).all()
    assert (table["ci_low"] < table["ci_high"]).all()
    pd.testing.assert_frame_equal(draws, bootstrap_rho(runs, measures, 300, rng_seed=7))
    assert not draws.equals(bootstrap_rho(runs, measures, 300, rng_seed=8))
    # a run's draws do not depend on the other runs of the sweep
    alone = bootstrap_rho({(0.1, 1): runs[(0.1, 1)]}, measures, 300, rng_seed=7)
    pd.testing.assert_frame_equal(alone, draws[draws["seed"] == 1].reset_index(drop=True))
    mean = seed_aggregate(draws).iloc[0]
    assert mean["rho"] == pytest.approx(table["rho"].mean())
    assert mean["ci_low"] <= mean["rho"] <= mean["ci_high"]


def test_seed_aggregate_is_the_mean_and_range_over_seeds():
    swapped = {**COSTS, "GoToLocal": 1.5}  # costs [1, 1.5, 2, 3]: ρ = 1 against the rank
    runs = {(0.0, 0): constant_levels(COSTS), (0.0, 1): constant_levels(swapped)}
    draws = bootstrap_rho(runs, {"spec_rank": LEVEL_DIFFICULTY}, resamples=40)
    row = seed_aggregate(draws).iloc[0]
    assert (row["alpha"], row["measure"], row["seeds"]) == (0.0, "spec_rank", 2)
    assert (row["rho"], row["rho_min"], row["rho_max"]) == pytest.approx((0.7, 0.4, 1.0))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.7, 0.7))


def test_sweep_figures_are_written(tmp_path):
    from synthetic import synthetic_tables

    layers = [[0, 16, 32], [32, 64]]
    levels = ("BabyAI-GoToRedBall-v0", "BabyAI-GoToLocal-v0", "BabyAI-PickupLoc-v0")
    summaries, usages = [], []
    for alpha in (0.0, 0.1):
        for seed in (0, 1):
            routes, _ = synthetic_tables(layers, levels=levels, episodes_per_level=4, seed=seed)
            summaries.append(level_summary(routes, alpha, seed))
            usages.append(usage_table(routes, layers, alpha, seed))
    summary = pd.concat(summaries, ignore_index=True)
    measured = {"GoToRedBall": 4.0, "GoToLocal": math.inf}  # PickupLoc not measured
    paths = [
        plot_cost_vs_difficulty(summary, tmp_path / "cost.png"),
        plot_cost_vs_difficulty(summary, tmp_path / "measured.png", measured),
        plot_usage(pd.concat(usages), tmp_path / "usage.png"),
    ]
    # three seeds with equal success: their float mean can lie just outside them (0.99 here),
    # which once reached matplotlib as a negative error bar
    summary["success"] = 0.99
    summary = pd.concat([summary, summary[summary["seed"] == 0].assign(seed=2)])
    paths.append(plot_success_vs_alpha(summary, tmp_path / "success.png"))
    assert all(path.stat().st_size > 0 for path in paths)
