"""The packed core (issue 22): equal to the reference, same parameters, chosen by device,
compilable, and usable by a TorchRL collector.

Values and gradients are compared in float64 on CPU (the packed path sums the same terms in
another order, plus exact zeros from the block-diagonal weights). On a GPU, when there is one,
the same comparisons run in float32 with cuDNN's TF32 off, at ``GPU_TOL``.
"""

import pathlib

import pytest
import torch
from tensordict import TensorDict
from torchrl.modules import set_recurrent_mode

from mop_torchrl import MoPConfig, MoPModule
from mop_torchrl.core.model import AUTO_IMPLEMENTATION, resolve_implementation
from mop_torchrl.core.packed import pack_grus, packed_gru_cell

CONFIGS = ["0,4,8;6", "0", "0;5,3", "7,2,0;0;3", "16,32;8,1"]
CPU_TOL = {"atol": 1e-9, "rtol": 1e-9}  # float64
GPU_TOL = {"atol": 2e-4, "rtol": 2e-4}  # float32, TF32 off
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


@pytest.fixture
def no_tf32():
    """cuDNN's GRUs (the reference path) use TF32 by default on Ampere and later GPUs."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def modules(layers: str, device: str, dtype: torch.dtype, **kwargs) -> dict[str, MoPModule]:
    cfg = MoPConfig(input_dim=5, layers=layers, intermediate_dim=12, router_dim=4, **kwargs)
    out = {
        name: MoPModule(cfg, in_key="x", implementation=name) for name in ("packed", "reference")
    }
    out["reference"].load_state_dict(out["packed"].state_dict())
    return {name: module.to(device, dtype) for name, module in out.items()}


def make_td(module: MoPModule, shape: list[int], device: str, dtype: torch.dtype) -> TensorDict:
    x = torch.randn(*shape, module.config.input_dim, dtype=dtype)
    td = TensorDict({module.in_key: x, "is_init": torch.rand(*shape, 1) < 0.25}, shape).update(
        module.initial_state(shape).apply(lambda t: torch.randn_like(t, dtype=dtype))
    )
    return td.to(device)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layers", CONFIGS)
@pytest.mark.parametrize("recurrent", [False, True])
def test_packed_equals_reference(layers, recurrent, device, no_tf32):
    """Step mode (is_init resets to zero) and recurrent mode (restarts from the stored state at
    every is_init), outputs and every gradient, expert dropout included in step mode."""
    torch.manual_seed(0)
    dtype, tol = (torch.float64, CPU_TOL) if device == "cpu" else (torch.float32, GPU_TOL)
    # Expert dropout draws the same numbers in step mode only (the reference recurrent mode
    # draws them for its padded segments).
    dropout = {"dropout_gamma": 0.5, "dropout_beta": 0.0 if recurrent else 0.8}
    mods = modules(layers, device, dtype, **dropout)
    td = make_td(mods["packed"], [3, 9] if recurrent else [4], device, dtype)
    out_packed, grads_packed = run_and_grad(mods["packed"], td, recurrent, seed=1)
    out_ref, grads_ref = run_and_grad(mods["reference"], td, recurrent, seed=1)
    torch.testing.assert_close(out_packed, out_ref, **tol)
    for g_packed, g_ref in zip(grads_packed, grads_ref, strict=True):
        if g_ref is None:  # e.g. a state overwritten by is_init in step mode
            assert g_packed is None or not g_packed.any()
        else:
            torch.testing.assert_close(g_packed, g_ref, **tol)


def test_packed_weights_layout():
    """Gate-major rows, block-diagonal hidden weights with exact zeros off the diagonal."""
    grus = [torch.nn.GRU(3, 2), torch.nn.GRU(3, 4), torch.nn.GRU(3, 1)]
    packed = pack_grus(grus)
    total = 7
    w_hh = packed.w_hh.view(3, total, total)
    offset = 0
    for gru, size in zip(grus, packed.sizes):
        rows = slice(offset, offset + size)
        for gate in range(3):
            own = gru.weight_hh_l0[gate * size : (gate + 1) * size]
            assert torch.equal(w_hh[gate, rows, rows], own)
            own_ih = gru.weight_ih_l0[gate * size : (gate + 1) * size]
            assert torch.equal(packed.w_ih.view(3, total, 3)[gate, rows], own_ih)
        off_diagonal = torch.ones(total, dtype=torch.bool)
        off_diagonal[rows] = False
        assert not w_hh[:, rows][..., off_diagonal].any()
        offset += size
    x, h = torch.randn(4, 3), torch.randn(4, total)
    expected = torch.cat(
        [g(x[None], s[None])[1][0] for g, s in zip(grus, h.split(packed.sizes, -1))], -1
    )
    torch.testing.assert_close(packed_gru_cell(x, h, packed), expected)


def test_same_parameters_and_checkpoints_load(tmp_path):
    """Every implementation has the same state dict (keys and shapes), and a checkpoint written
    by v0.2 runs on the packed path with the fused path's outputs."""
    from mop_torchrl.babyai.policy import policy_parts
    from mop_torchrl.train.policy import load_actor

    cfg = MoPConfig(input_dim=5, layers="0,4,8;6", intermediate_dim=12, router_dim=4)
    shapes = {
        name: {k: v.shape for k, v in MoPModule(cfg, implementation=name).state_dict().items()}
        for name in ("auto", "fused", "reference", "packed")
    }
    assert all(value == shapes["fused"] for value in shapes.values())

    actor, _ = load_actor(pathlib.Path(__file__).parent / "data" / "checkpoint_v0.2.pt")
    core = policy_parts(actor).core
    packed = MoPModule(core.config, in_key=core.in_key, implementation="packed").eval()
    packed.load_state_dict(core.state_dict())  # strict: same keys
    td = make_td(core, [3], "cpu", torch.float32)
    expected = core(td.clone())
    torch.testing.assert_close(packed(td.clone()), expected, atol=1e-5, rtol=1e-5)


def test_auto_picks_by_device_and_mode():
    assert AUTO_IMPLEMENTATION["cpu"] == {"step": "fused", "sequence": "fused"}
    for sequence in (False, True):
        assert resolve_implementation("auto", "cpu", sequence) == "fused"
        assert resolve_implementation("auto", "meta", sequence) == "fused"  # unlisted: as CPU
        expected = AUTO_IMPLEMENTATION["cuda"]["sequence" if sequence else "step"]
        assert resolve_implementation("auto", torch.device("cuda", 0), sequence) == expected
        for name in ("fused", "reference", "packed"):  # overrides are taken as given
            assert resolve_implementation(name, "cuda", sequence) == name
    with pytest.raises(ValueError, match="'auto', 'fused', 'reference' or 'packed'"):
        MoPModule(MoPConfig(input_dim=5, layers="4"), implementation="triton")


def test_auto_is_the_default_and_runs_the_fused_path_on_cpu(monkeypatch):
    """CPU behaviour does not change: the default module runs exactly what "fused" runs."""
    cfg = MoPConfig(input_dim=5, layers="0,4,8;6", intermediate_dim=12, router_dim=4)
    auto, fused = MoPModule(cfg, in_key="x"), MoPModule(cfg, in_key="x", implementation="fused")
    assert auto.core.implementation == "auto"
    fused.load_state_dict(auto.state_dict())
    ran = []
    original = auto.core._run
    monkeypatch.setattr(auto.core, "_run", lambda *args: ran.append(args[-1]) or original(*args))
    for recurrent, shape in ((False, [4]), (True, [3, 9])):
        td = make_td(auto, shape, "cpu", torch.float32)
        with set_recurrent_mode(recurrent):
            assert torch.equal(auto.eval()(td.clone())["features"], fused.eval()(td)["features"])
    assert ran == ["fused", "fused"]


def test_auto_under_vmap_runs_the_fused_path():
    """The reference's cuDNN advantage does not exist under torch.func (it loops over cells)."""
    seen = []

    def probe(x):
        seen.append(resolve_implementation("auto", "cuda", True))
        return x

    torch.vmap(probe)(torch.zeros(2, 3))
    assert seen == ["fused"]


@pytest.mark.parametrize("recurrent", [False, True])
def test_packed_vmap_over_parameter_sets_equals_a_loop(recurrent):
    """Stacked parameter sets under torch.vmap (ensembles): the packing has no in-place write."""
    torch.manual_seed(0)
    cfg = MoPConfig(input_dim=5, layers="0,4,8;6", intermediate_dim=12, router_dim=4)
    sets = [MoPModule(cfg, in_key="x", implementation="packed").eval() for _ in range(3)]
    module = MoPModule(cfg, in_key="x", implementation="packed").eval()
    td = make_td(module, [3, 9] if recurrent else [4], "cpu", torch.float32)
    params = torch.stack([TensorDict.from_module(m) for m in sets]).detach()

    def call(p, data):
        with p.to_module(module), set_recurrent_mode(recurrent):
            return module(data.clone(False))["features"]

    out = torch.vmap(call, (0, None))(params, td)
    for k, other in enumerate(sets):
        with set_recurrent_mode(recurrent):
            expected = other(td.clone(False))["features"]
        torch.testing.assert_close(out[k], expected, atol=1e-5, rtol=1e-5)


def _compiled_equals_eager(device: str) -> None:
    torch.manual_seed(0)
    cfg = MoPConfig(input_dim=5, layers="0,4;3", intermediate_dim=8, router_dim=2)
    module = MoPModule(cfg, in_key="x", implementation="packed").to(device).eval()
    compiled = torch.compile(module, fullgraph=True, dynamic=False)
    td = make_td(module, [4], device, torch.float32)
    # allow_rnn: dynamo refuses to even hold an nn.GRU otherwise (the packed step only reads its
    # parameters); the package compiles its actors with it (mop_torchrl.babyai.policy).
    with torch.no_grad(), torch._dynamo.config.patch(allow_rnn=True):
        expected = module(td.clone())
        for _ in range(2):  # the second call reuses the compiled code
            torch.testing.assert_close(compiled(td.clone()), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_packed_step_equals_eager():
    """``torch.compile(fullgraph=True)`` captures the whole packed step (no graph break:
    ``fullgraph`` raises on one) and computes what eager computes."""
    _compiled_equals_eager("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_and_compiled_packed_step_equal_eager():
    """On a GPU: the eager packed step captured in a CUDA graph, and the compiled one."""
    from mop_torchrl.bench import _cuda_graph

    _compiled_equals_eager("cuda")
    torch.manual_seed(0)
    cfg = MoPConfig(input_dim=5, layers="0,4;3", intermediate_dim=8, router_dim=2)
    module = MoPModule(cfg, in_key="x", implementation="packed").cuda().eval()
    td = make_td(module, [4], "cuda", torch.float32)
    with torch.no_grad():
        expected = module(td.clone())
    replay = _cuda_graph(lambda: module(td))
    replay()
    torch.testing.assert_close(td.select(*expected.keys(True, True)), expected)


@pytest.mark.slow
def test_compiled_actor_in_a_collector():
    """A BabyAI actor with the packed core, compiled by TorchRL's ``Collector(...,
    compile_policy=...)``, collects batches with its recurrent state carried."""
    from torchrl.collectors import Collector

    from mop_torchrl.babyai.envs import make_babyai_env
    from mop_torchrl.babyai.policy import make_policy, policy_parts

    cfg = MoPConfig(input_dim=8, layers="0,4;4", intermediate_dim=8, router_dim=4)
    actor, _ = make_policy("mop", mop=cfg)
    core = policy_parts(actor).core
    core.core.implementation = "packed"
    env = make_babyai_env("GoToRedBall", num_envs=2, parallel=False)
    collector = Collector(
        env,
        actor.eval(),
        frames_per_batch=8,
        total_frames=24,
        auto_register_policy_transforms=True,
        compile_policy={"backend": "eager", "fullgraph": True, "warmup": 1},
    )
    try:
        with torch._dynamo.config.patch(allow_rnn=True):
            batches = list(collector)
    finally:
        collector.shutdown()
    assert len(batches) == 3
    last = batches[-1]
    state = last["next", "recurrent_state", "block0", "router"]
    assert state.shape == (2, 4, 1, 4) and state.abs().sum() > 0
    assert collector.compiled_policy
