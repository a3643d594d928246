"""MoPModule as a drop-in for GRUModule: torch.vmap, TorchRL's RNN helpers, keyword calls."""

import pytest
import torch
from tensordict import TensorDict
from torchrl.modules import canonicalize_rnn_subset, set_recurrent_mode
from torchrl.objectives.value import GAE

from mop_torchrl import MoPConfig, MoPModule

CONFIG = MoPConfig(input_dim=5, layers="0,4,8;6", intermediate_dim=12, router_dim=4)


def make_td(module: MoPModule, shape: list[int]) -> TensorDict:
    td = TensorDict({"x": torch.randn(*shape, 5), "is_init": torch.rand(*shape, 1) < 0.25}, shape)
    return td.update(module.initial_state(shape).apply(torch.randn_like))


def outputs(td: TensorDict, module: MoPModule) -> TensorDict:
    return td.select("features", *module.out_keys[1:])


@pytest.mark.parametrize("implementation", ["fused", "reference"])
@pytest.mark.parametrize("recurrent", [False, True])
def test_vmap_over_parameter_sets_equals_a_loop(implementation, recurrent):
    """Stacked parameter sets under torch.vmap give each set's outputs and gradients."""
    torch.manual_seed(0)
    modules = [MoPModule(CONFIG, in_key="x", implementation=implementation) for _ in range(3)]
    module = MoPModule(CONFIG, in_key="x", implementation=implementation).eval()  # functional
    td = make_td(module, [3, 9] if recurrent else [4])
    params = torch.stack([TensorDict.from_module(m) for m in modules]).detach()
    keys = [tuple(name.split(".")) for name, _ in module.named_parameters()]
    for key in keys:
        params[key].requires_grad_()

    def call(p, data):
        with p.to_module(module), set_recurrent_mode(recurrent):
            return module(data.clone(False))

    out = torch.vmap(call, (0, None))(params, td)
    grads = torch.autograd.grad(out["features"].pow(2).sum(), [params[key] for key in keys])
    for k, other in enumerate(modules):
        with set_recurrent_mode(recurrent):
            expected = other.eval()(td.clone(False))
        torch.testing.assert_close(outputs(out[k], module), outputs(expected, module))
        expected_grads = torch.autograd.grad(
            expected["features"].pow(2).sum(), list(other.parameters())
        )
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad[k], expected_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("recurrent", [False, True])
def test_vmap_over_data_equals_a_loop(recurrent):
    """vmap over stacked inputs with shared weights (what TorchRL's value estimators do)."""
    torch.manual_seed(0)
    module = MoPModule(CONFIG, in_key="x").eval()
    shape = [3, 9] if recurrent else [4]
    data = torch.stack([make_td(module, shape) for _ in range(2)])

    def call(td):
        with set_recurrent_mode(recurrent):
            return module(td.clone(False))

    out = torch.vmap(call)(data)
    for k in range(2):
        torch.testing.assert_close(outputs(out[k], module), outputs(call(data[k]), module))


def test_vmap_in_train_mode_needs_different_randomness():
    """Expert dropout draws random numbers: each map draws its own with randomness='different'."""
    torch.manual_seed(0)
    config = MoPConfig(
        input_dim=5, layers="0,4,8", intermediate_dim=12, router_dim=4, dropout_gamma=0.5
    )
    module = MoPModule(config, in_key="x").train()
    td = make_td(module, [64])
    data = torch.stack([td, td])  # identical inputs in both maps
    with pytest.raises(RuntimeError, match="randomness"):
        torch.vmap(module)(data.clone())
    out = torch.vmap(module, randomness="different")(data.clone())
    weights = out["routing", "block0"]
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 64))
    assert not torch.equal(weights[0], weights[1])  # different dropout draws
    module.eval()
    out = torch.vmap(module)(data.clone())
    torch.testing.assert_close(out["routing", "block0"][0], out["routing", "block0"][1])


def test_gae_with_vmap_equals_gae_without():
    """GAE over a recurrent MoP critic no longer needs deactivate_vmap=True."""
    from tensordict.nn import TensorDictModule, TensorDictSequential

    torch.manual_seed(0)
    core = MoPModule(CONFIG, in_key="x").eval()
    critic = TensorDictSequential(
        core, TensorDictModule(torch.nn.Linear(12, 1), ["features"], ["state_value"])
    )
    td = make_td(core, [3, 6])
    td["next"] = make_td(core, [3, 6]).exclude("is_init")
    td["next", "is_init"] = torch.zeros(3, 6, 1, dtype=torch.bool)
    td["next", "reward"] = torch.randn(3, 6, 1)
    td["next", "done"] = torch.rand(3, 6, 1) < 0.2
    td["next", "terminated"] = td["next", "done"].clone()
    td.names = [None, "time"]
    values = []
    for deactivate_vmap in (False, True):
        gae = GAE(gamma=0.9, lmbda=0.95, value_network=critic, deactivate_vmap=deactivate_vmap)
        with torch.no_grad(), set_recurrent_mode(True):
            values.append(gae(td.clone())["advantage"])
    torch.testing.assert_close(values[0], values[1])


def test_canonicalize_rnn_subset_accepts_the_module():
    module = MoPModule(CONFIG, in_key="x")
    assert module.canonical_keys == [*module.in_keys, *module.out_keys]
    td = make_td(module, [4, 6]).transpose(0, 1).contiguous().transpose(0, 1)
    td["other"] = torch.randn(6, 4).t()  # not the module's: must stay as it is
    assert not td["x"].is_contiguous()
    for out in (canonicalize_rnn_subset(td, [module]), module.canonicalize(td)):
        assert all(out[key].is_contiguous() for key in module.in_keys)
        assert not out["other"].is_contiguous()
        torch.testing.assert_close(out, td)


def test_keyword_call_matches_the_tensordict_call():
    torch.manual_seed(0)
    module = MoPModule(CONFIG, in_key="x").eval()
    td = make_td(module, [4])
    expected = module(td.clone())
    kwargs = {"_".join(k) if isinstance(k, tuple) else k: td[k] for k in module.in_keys}
    values = module(**kwargs)
    assert len(values) == len(module.out_keys)
    for key, value in zip(module.out_keys, values, strict=True):
        torch.testing.assert_close(value, expected[key])


def test_default_recurrent_mode():
    torch.manual_seed(0)
    step = MoPModule(CONFIG, in_key="x").eval()
    sequence = MoPModule(CONFIG, in_key="x", default_recurrent_mode=True).eval()
    sequence.load_state_dict(step.state_dict())
    assert not step.recurrent_mode and sequence.recurrent_mode
    td = make_td(step, [3, 5])
    with set_recurrent_mode(True):
        assert step.recurrent_mode
        expected = step(td.clone())
    torch.testing.assert_close(sequence(td.clone())["features"], expected["features"])
    with set_recurrent_mode(False):
        assert not sequence.recurrent_mode
    with pytest.raises(AttributeError):
        sequence.recurrent_mode = False
