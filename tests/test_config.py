"""MoPConfig: layer-spec parsing, presets, round trips, and clear errors on bad input."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mop_torchrl import MoPConfig, parse_layers
from mop_torchrl.core.config import format_layers


def test_spec_forms_agree():
    expected = [[32, 64, 128], [64, 128, 256]]
    assert parse_layers("32,64,128;64,128,256") == expected
    assert parse_layers(["32,64,128", "64,128,256"]) == expected
    assert parse_layers([[32, 64, 128], [64, 128, 256]]) == expected
    assert parse_layers(" 16 , 32 ") == [[16, 32]]
    assert parse_layers("0") == [[0]]  # a pure skip block is allowed


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("32,,64", "'32,,64'"),
        ("a,b", "'a'"),
        ("-4", "'-4'"),
        ("", "''"),
        ("32;", "block 1 is empty"),
        (";", "block 0 is empty"),
        ("16;;8", "block 1 is empty"),
        ("1.5", "'1.5'"),
        ([], "non-empty"),
        (["16,32;8"], "several blocks"),
        ([[16, -1]], "-1"),
        ([[]], "empty"),
    ],
)
def test_bad_layer_specs_name_the_offending_text(spec, fragment):
    with pytest.raises(ValueError) as err:
        MoPConfig(layers=spec)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "field, value",
    [
        ("input_dim", 0),
        ("intermediate_dim", -3),
        ("router_dim", 0),
        ("dropout_gamma", 0.0),
        ("dropout_gamma", 1.5),
        ("dropout_beta", -0.1),
        ("alpha", -1e-5),
        ("epsilon", 0.0),
        ("cost_mode", "log"),
        ("expert_norm", "batch"),
    ],
)
def test_bad_values_raise(field, value):
    with pytest.raises(ValueError, match=field):
        MoPConfig(**{field: value})


def test_presets_and_round_trip():
    seed = MoPConfig.from_preset("seed", input_dim=64)
    assert (seed.layers, seed.intermediate_dim, seed.router_dim) == (
        [[32, 64, 128], [64, 128, 256]],
        256,
        64,
    )
    paper = MoPConfig.from_preset("paper", alpha=0.0)
    assert paper.layers == [[0, 16, 32]] * 3 and paper.intermediate_dim == 64
    assert paper.alpha == 0.0
    assert MoPConfig.from_dict(seed.to_dict()) == seed
    with pytest.raises(ValueError, match="unknown MoP preset"):
        MoPConfig.from_preset("huge")
    with pytest.raises(ValueError, match="bogus"):
        MoPConfig.from_dict({"bogus": 1})


@given(st.lists(st.lists(st.integers(0, 512), min_size=1, max_size=5), min_size=1, max_size=4))
def test_format_parse_round_trip(layers):
    assert parse_layers(format_layers(layers)) == layers
