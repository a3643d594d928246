"""MoPModule: step/recurrent equivalence, is_init semantics, gradients, dropout, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict
from torchrl.modules import set_recurrent_mode

from mop_torchrl import MoPConfig, MoPModule


def small_config(layers="0,4,8;6", input_dim=5, dim=12, router=4, **kwargs) -> MoPConfig:
    return MoPConfig(
        input_dim=input_dim, layers=layers, intermediate_dim=dim, router_dim=router, **kwargs
    )


def step_loop(module: MoPModule, x, stored: TensorDict, is_init):
    """Independent reference: step mode one step at a time over ``[B, T]``.

    Every segment (t=0 or is_init) restarts from the *stored* state at that step, as recurrent
    mode must; otherwise the state carried from the previous step is used.
    Returns features ``[B, T, D]``, the carried state after each step, and routing.
    """
    batch, steps = is_init.shape
    carried, features, after, routing = None, [], [], []
    for t in range(steps):
        start = is_init[:, t] | (t == 0)
        state = stored[:, t].clone()
        if carried is not None:
            for key in module.state_keys:
                state.set(key, torch.where(start[:, None, None], state[key], carried[key]))
        td = TensorDict({"x": x[:, t], "is_init": torch.zeros(batch, 1, dtype=torch.bool)}, [batch])
        td.update(state)
        td = module(td)
        carried = td["next"].select(module.state_key)
        features.append(td["features"])
        after.append(carried)
        routing.append(td["routing"])
    return torch.stack(features, 1), torch.stack(after, 1), torch.stack(routing, 1)


layer_spec = st.lists(
    st.lists(st.sampled_from([0, 1, 3, 8, 17, 64]), min_size=1, max_size=4), min_size=1, max_size=3
)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    layers=layer_spec,
    batch=st.integers(1, 3),
    steps=st.integers(1, 9),
    seed=st.integers(0, 2**16),
    implementation=st.sampled_from(["fused", "reference"]),
)
def test_recurrent_mode_equals_step_loop(layers, batch, steps, seed, implementation):
    torch.manual_seed(seed)
    module = MoPModule(small_config(layers), in_key="x", implementation=implementation).eval()
    x = torch.randn(batch, steps, 5)
    is_init = torch.rand(batch, steps) < 0.3
    # Non-zero stored states everywhere: restarts must take the stored state (SliceSampler).
    stored = module.initial_state([batch, steps]).apply(lambda t: torch.randn_like(t))
    td = TensorDict({"x": x, "is_init": is_init.unsqueeze(-1)}, [batch, steps]).update(stored)
    with set_recurrent_mode(True):
        out = module(td.clone())
    features, after, routing = step_loop(module, x, stored, is_init)
    torch.testing.assert_close(out["features"], features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["routing"], routing, atol=1e-5, rtol=1e-5)
    # ("next", k): the step loop's state at each segment's last step, zero elsewhere.
    ends = torch.ones_like(is_init)
    ends[:, :-1] = is_init[:, 1:]
    for key in module.state_keys:
        expected = after[key] * ends[:, :, None, None]
        torch.testing.assert_close(out["next", *key], expected, atol=1e-5, rtol=1e-5)


def test_fused_equals_reference_forward_and_gradients():
    torch.manual_seed(0)
    cfg = small_config("0,3,9;16,2,0", dropout_beta=0.0)
    # float64: in float32 the two summation orders differ by ~1e-5 in gradients on some CPUs
    fused = MoPModule(cfg, in_key="x", implementation="fused").double()
    reference = MoPModule(cfg, in_key="x", implementation="reference").double()
    reference.load_state_dict(fused.state_dict())
    td = TensorDict(
        {"x": torch.randn(3, 11, 5).double(), "is_init": (torch.rand(3, 11, 1) < 0.2)}, [3, 11]
    ).update(reference.initial_state([3, 11]).apply(lambda t: torch.randn_like(t).double()))
    grads, outs = [], []
    for module in (fused, reference):
        with set_recurrent_mode(True):
            out = module(td.clone())
        loss = out["features"].pow(2).sum() + out["routing", "cost"].sum() * 1e-3
        grads.append(torch.autograd.grad(loss, list(module.parameters())))
        outs.append(out)
    for key in ("features", ("routing", "block0"), ("routing", "cost"), "next"):
        torch.testing.assert_close(outs[0][key], outs[1][key], atol=1e-9, rtol=1e-9)
    # Step mode too.
    step = td[:, 0].clone()
    torch.testing.assert_close(fused(step.clone())["features"], reference(step)["features"])
    for g_fused, g_ref in zip(*grads):
        torch.testing.assert_close(g_fused, g_ref, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("shape", [[], [3], [2, 3]])
def test_step_mode_batch_shapes(shape):
    torch.manual_seed(0)
    module = MoPModule(small_config(), in_key="x").eval()
    td = TensorDict(
        {"x": torch.randn(*shape, 5), "is_init": torch.zeros(*shape, 1, dtype=torch.bool)}, shape
    ).update(module.initial_state(shape).apply(torch.randn_like))
    out = module(td.clone())
    assert out["features"].shape == (*shape, 12)
    assert out["routing", "block0"].shape == (*shape, 3)
    assert out["routing", "cost"].shape == tuple(shape)
    # Same numbers as the flattened batch.
    flat = module(td.reshape(-1).clone())
    torch.testing.assert_close(out["features"].reshape(-1, 12), flat["features"])
    # is_init resets to zero regardless of the stored state.
    reset = td.clone()
    reset["is_init"] = torch.ones(*shape, 1, dtype=torch.bool)
    zeros = td.clone().update(module.initial_state(shape))
    torch.testing.assert_close(module(reset)["features"], module(zeros)["features"])


@pytest.mark.parametrize("shape", [[7], [2, 7], [2, 2, 7]])
def test_recurrent_mode_batch_shapes(shape):
    module = MoPModule(small_config(), in_key="x").eval()
    td = TensorDict(
        {"x": torch.randn(*shape, 5), "is_init": torch.zeros(*shape, 1, dtype=torch.bool)}, shape
    )
    td[..., 0]["is_init"].fill_(True)
    with set_recurrent_mode(True):
        out = module(td)
    assert out["features"].shape == (*shape, 12)
    assert out["next", "recurrent_state", "block1", "expert0"].shape == (*shape, 1, 6)


def test_gradients_reach_every_parameter_in_recurrent_mode():
    torch.manual_seed(0)
    module = MoPModule(small_config("0,4,8;6,3"), in_key="x").train()
    td = TensorDict({"x": torch.randn(4, 10, 5), "is_init": torch.rand(4, 10, 1) < 0.2}, [4, 10])
    td.update(module.initial_state([4, 10]))
    with set_recurrent_mode(True):
        out = module(td)
    (out["features"].pow(2).mean() + out["routing", "cost"].mean()).backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_expert_dropout_only_in_training():
    torch.manual_seed(0)
    # γ=1, β=1: every non-argmax expert is dropped with probability 1 − p/γ > 0.
    module = MoPModule(small_config("0,4,8,16", dropout_beta=1.0, dropout_gamma=1.0), in_key="x")
    td = TensorDict({"x": torch.randn(64, 5), "is_init": torch.ones(64, 1, dtype=torch.bool)}, [64])
    train_weights = module.train()(td.clone())["routing", "block0"]
    assert (train_weights == 0).any()
    module.eval()
    first, second = module(td.clone()), module(td.clone())
    assert (first["routing", "block0"] > 0).all()
    torch.testing.assert_close(first["features"], second["features"])


def test_inference_knobs():
    torch.manual_seed(0)
    module = MoPModule(small_config("0,4,8"), in_key="x").eval()
    td = TensorDict({"x": torch.randn(32, 5), "is_init": torch.ones(32, 1, dtype=torch.bool)}, [32])
    weights = module.set_inference_knobs(disable_largest=True)(td.clone())["routing", "block0"]
    assert (weights[:, 2] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(32))
    weights = module.set_inference_knobs(weight_threshold=0.34)(td.clone())["routing", "block0"]
    assert ((weights == 0) | (weights >= 0.34)).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(32))


def test_missing_primer_is_a_clear_error():
    module = MoPModule(small_config(), in_key="x")
    fresh = TensorDict({"x": torch.randn(3, 5), "is_init": torch.ones(3, 1, dtype=torch.bool)}, [3])
    module(fresh)  # first step of fresh episodes: zero states may be implied
    stale = TensorDict(
        {"x": torch.randn(3, 5), "is_init": torch.zeros(3, 1, dtype=torch.bool)}, [3]
    )
    with pytest.raises(KeyError, match="primer"):
        module(stale)
    with pytest.raises(KeyError, match="InitTracker"):
        module(TensorDict({"x": torch.randn(3, 5)}, [3]))


def test_mismatched_input_dim_is_a_clear_error():
    module = MoPModule(small_config(), in_key="x")
    td = TensorDict({"x": torch.randn(3, 7), "is_init": torch.ones(3, 1, dtype=torch.bool)}, [3])
    with pytest.raises(ValueError, match="input_dim is 5"):
        module(td)


def test_keys_and_primer():
    module = MoPModule(small_config("0,4,8;6"), in_key="x")
    assert module.state_keys == [
        ("recurrent_state", "block0", "router"),
        ("recurrent_state", "block0", "expert1"),
        ("recurrent_state", "block0", "expert2"),
        ("recurrent_state", "block1", "router"),
        ("recurrent_state", "block1", "expert0"),
    ]
    assert "is_init" in module.in_keys
    assert ("next", "recurrent_state", "block0", "expert2") in module.out_keys
    spec = module.make_tensordict_primer().primers
    assert spec["recurrent_state", "block0", "expert2"].shape[-2:] == (1, 8)
    info = module.routing_info(
        module(
            module.initial_state([2]).update(
                {"x": torch.randn(2, 5), "is_init": torch.ones(2, 1, dtype=torch.bool)}
            )
        )
    )
    assert set(info) == {"block0", "block1", "cost"}


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "x",
            torch.randn(2, 5, dtype=torch.float64),
            "'x' has dtype torch.float64, expected torch.float32",
        ),
        ("x", torch.randn(2, 5).half(), "'x' has dtype torch.float16, expected torch.float32"),
        ("is_init", torch.ones(2, 1), "'is_init' has dtype torch.float32, expected torch.bool"),
        ("is_init", torch.ones(2, 1, dtype=torch.long), "'is_init' has dtype torch.int64"),
        (("recurrent_state", "block0", "router"), torch.zeros(2, 1, 4).double(), "router"),
    ],
)
def test_wrong_dtypes_are_a_clear_error(key, value, message):
    module = MoPModule(small_config(), in_key="x")
    td = TensorDict({"x": torch.randn(2, 5), "is_init": torch.zeros(2, 1, dtype=torch.bool)}, [2])
    td.update(module.initial_state([2]))
    td.set(key, value)
    with pytest.raises(TypeError, match=message):
        module(td)
