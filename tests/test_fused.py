"""The fused core equals the reference (forward and gradients), compiles, and is benchmarked.

Fused and reference are compared in float64: they sum the same terms in different orders, and
in float32 the gradients accumulated over a few dozen steps differ by up to ~3e-5 on some
CPUs (seen on AMD EPYC), while in float64 they agree to ~1e-13 on any CPU.
"""

import json

import pytest
import torch
from tensordict import TensorDict
from torchrl.modules import set_recurrent_mode

from mop_torchrl import MoPConfig, MoPModule, bench
from mop_torchrl.core.fused import gru_scan
from mop_torchrl.core.model import MoPCore

CONFIGS = ["0,4,8;6", "0", "0;5,3", "7,2,0;0;3", "16,32;8,1"]


TOL = {"atol": 1e-9, "rtol": 1e-9}  # float64 comparisons


def pair(layers: str, dtype: torch.dtype = torch.float32, **kwargs) -> tuple[MoPModule, MoPModule]:
    cfg = MoPConfig(input_dim=5, layers=layers, intermediate_dim=12, router_dim=4, **kwargs)
    fused = MoPModule(cfg, in_key="x", implementation="fused").to(dtype)
    reference = MoPModule(cfg, in_key="x", implementation="reference").to(dtype)
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def run_and_grad(module: MoPModule, td: TensorDict, recurrent: bool, seed: int):
    """Outputs and gradients w.r.t. parameters, input and stored states (train mode)."""
    leaves = td.apply(lambda t: t.detach().requires_grad_(t.is_floating_point()))
    torch.manual_seed(seed)
    with set_recurrent_mode(recurrent):
        out = module(leaves.clone(False))
    loss = out["features"].pow(2).sum() + 1e-3 * out["routing", "cost"].sum()
    loss = loss + sum(out["next", *key].pow(2).sum() for key in module.state_keys)
    inputs = [leaves["x"], *(leaves[key] for key in module.state_keys)]
    grads = torch.autograd.grad(loss, [*module.parameters(), *inputs], allow_unused=True)
    return out.exclude(*td.keys()), grads


@pytest.mark.parametrize("layers", CONFIGS)
@pytest.mark.parametrize("recurrent", [False, True])
def test_fused_equals_reference(layers, recurrent):
    torch.manual_seed(0)
    # Expert dropout draws the same numbers in step mode only (the reference recurrent mode
    # draws them for its padded segments).
    dropout = {"dropout_gamma": 0.5, "dropout_beta": 0.0 if recurrent else 0.8}
    fused, reference = pair(layers, torch.float64, **dropout)
    shape = [3, 9] if recurrent else [4]
    td = TensorDict(
        {"x": torch.randn(*shape, 5, dtype=torch.float64), "is_init": torch.rand(*shape, 1) < 0.25},
        shape,
    ).update(fused.initial_state(shape).apply(lambda t: torch.randn_like(t, dtype=torch.float64)))
    out_fused, grads_fused = run_and_grad(fused, td, recurrent, seed=1)
    out_ref, grads_ref = run_and_grad(reference, td, recurrent, seed=1)
    torch.testing.assert_close(out_fused, out_ref, **TOL)
    for g_fused, g_ref in zip(grads_fused, grads_ref, strict=True):
        if g_ref is None:  # e.g. a state overwritten by is_init in step mode
            assert g_fused is None or not g_fused.any()
        else:
            torch.testing.assert_close(g_fused, g_ref, **TOL)


@pytest.mark.parametrize(("implementation", "layers"), [("fused", "0,3;4"), ("packed", "0,3;4,2")])
def test_core_from_initial_states(implementation, layers):
    """Sequences without resets (``starts=None``) run the same scan from ``[S, h]`` states."""
    torch.manual_seed(0)
    cfg = MoPConfig(input_dim=5, layers=layers, intermediate_dim=6, router_dim=2)
    fused = MoPCore(cfg, implementation).double().eval()
    reference = MoPCore(cfg, "reference").double().eval()
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    states = [
        [torch.randn(2, h, dtype=torch.float64, requires_grad=True) for h in b.state_sizes]
        for b in fused.blocks
    ]
    outs = [core(x, states) for core in (fused, reference)]
    torch.testing.assert_close(outs[0].features, outs[1].features, **TOL)
    grads = [torch.autograd.grad(out.features.sum(), states[1]) for out in outs]
    torch.testing.assert_close(grads[0], grads[1], **TOL)


@pytest.mark.parametrize("implementation", ["fused", "packed", "reference"])
def test_recurrent_mode_under_bfloat16_autocast(implementation):
    """Under autocast the products round to bfloat16 but the recurrences and the states stay
    float32 (the scan runs with autocast off): the features are the float32 ones up to that
    rounding."""
    torch.manual_seed(0)
    cfg = MoPConfig(input_dim=5, layers="0,8;16,4", intermediate_dim=12, router_dim=4)
    module = MoPModule(cfg, in_key="x", implementation=implementation)
    td = TensorDict({"x": torch.randn(3, 9, 5), "is_init": torch.rand(3, 9, 1) < 0.25}, [3, 9])
    td.update(module.initial_state([3, 9]).apply(torch.randn_like))
    with set_recurrent_mode(True):
        exact = module(td.clone())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = module(td.clone())
    for key in module.state_keys:
        assert rounded["next", *key].dtype == torch.float32
        torch.testing.assert_close(rounded["next", *key], exact["next", *key], atol=0.05, rtol=0)
    assert rounded["features"].dtype == torch.bfloat16
    torch.testing.assert_close(rounded["features"].float(), exact["features"], atol=0.1, rtol=0.05)


def test_gru_scan_weight_gradient_in_autocast_dtype():
    """Under autocast the scan's weight-gradient product runs in bfloat16 (as a Linear's
    does): the gradient is the float32 one up to that rounding, and float32 outside autocast."""
    torch.manual_seed(0)
    gru = torch.nn.GRU(6, 16, batch_first=True)
    gi = torch.nn.functional.linear(torch.randn(4, 12, 6), gru.weight_ih_l0, gru.bias_ih_l0)
    stored, starts = torch.randn(4, 12, 16), torch.rand(4, 12) < 0.2
    starts[:, 0] = True

    def grad_w_hh() -> torch.Tensor:
        out = gru_scan(gi.detach(), stored, starts, gru.weight_hh_l0, gru.bias_hh_l0)
        return torch.autograd.grad(out.square().sum(), gru.weight_hh_l0)[0]

    exact = grad_w_hh()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = grad_w_hh()
    assert rounded.dtype == exact.dtype == torch.float32
    assert not torch.equal(rounded, exact)  # the product did round
    torch.testing.assert_close(rounded, exact, atol=0.05 * exact.abs().max().item(), rtol=0.02)


def test_gru_scan_gradcheck():
    torch.manual_seed(0)
    batch, steps, size = 3, 5, 4
    options = {"dtype": torch.float64, "requires_grad": True}
    gi = torch.randn(batch, steps, 3 * size, **options)
    stored = torch.randn(batch, steps, size, **options)
    starts = torch.rand(batch, steps) < 0.3
    starts[:, 0] = True
    w_hh, b_hh = torch.randn(3 * size, size, **options), torch.randn(3 * size, **options)
    assert torch.autograd.gradcheck(
        lambda *args: gru_scan(args[0], args[1], starts, *args[2:]),
        (gi, stored, w_hh, b_hh),
    )


@pytest.mark.slow
def test_compiled_step_mode_matches_eager():
    torch.manual_seed(0)
    fused, _ = pair("0,4;3")
    fused.eval()
    td = TensorDict({"x": torch.randn(4, 5), "is_init": torch.rand(4, 1) < 0.5}, [4])
    td.update(fused.initial_state([4]).apply(torch.randn_like))
    compiled = torch.compile(fused)
    with torch.no_grad():
        expected = fused(td.clone())
        for _ in range(2):  # second call: compiled code reused
            torch.testing.assert_close(compiled(td.clone()), expected, atol=1e-5, rtol=1e-5)


def test_benchmarks_smoke(tmp_path, capsys):
    tiny = {"preset": "paper", "input_dim": 8, "gru_hidden": 16, "repeats": 2, "min_time": 0.0}
    step = bench.run_step_benchmark([1, 3], **tiny)
    sequence = bench.run_sequence_benchmark(2, 4, **tiny)
    for result, candidates in [
        (step, {"mop_fused", "mop_reference", "mop_packed", "gru"}),
        (
            sequence,
            {"mop_fused", "mop_reference", "mop_packed", "gru_pad", "gru_scan", "mop_step_loop"},
        ),
    ]:
        assert result["auto"] == {"step": "fused", "sequence": "fused"}  # on CPU
        assert {"device", "versions", "config", "params", "results"} <= set(result)
        assert {row["candidate"] for row in result["results"]} == candidates
        for row in result["results"]:
            assert row["min_s"] <= row["median_s"] <= row["max_s"]
            assert len(row["repeats_s"]) == 2 and row["samples_per_s"] > 0
        assert "x GRU time" in bench.format_table(result)
    out = tmp_path / "step.json"
    assert bench.main(["step", "--batches", "2", "--repeats", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["batches"] == [2]
    assert "mop_fused" in capsys.readouterr().out


@pytest.mark.slow
def test_collector_benchmark_smoke():
    result = bench.run_collector_benchmark(
        "GoToRedBall", num_envs=2, parallel=False, frames=32, repeats=1, preset="paper"
    )
    names = [row["candidate"] for row in result["results"]]
    assert names == ["env_only", "random", "gru", "mop"]
    assert all(row["frames_per_s"] > 0 for row in result["results"])
    assert "x random" in bench.format_table(result)
