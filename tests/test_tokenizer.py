import contextlib
import io
import re

import gymnasium as gym
import minigrid  # noqa: F401
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from minigrid.core.constants import COLOR_NAMES
from minigrid.envs.babyai.core.verifier import LOC_NAMES, OBJ_TYPES

from mop_torchrl.babyai.tokenizer import MAX_MISSION_TOKENS, PAD_TOKEN, VOCABULARY, MissionTokenizer

SEEDS_PER_LEVEL = 3


def _babyai_ids():
    return sorted(k for k in gym.registry if k.startswith("BabyAI-"))


@pytest.fixture(scope="module")
def missions():
    """Missions from every registered BabyAI level, a few seeds each."""
    out = {}
    for level in _babyai_ids():
        env = gym.make(level)
        with contextlib.redirect_stdout(io.StringIO()):
            out[level] = [env.reset(seed=s)[0]["mission"] for s in range(SEEDS_PER_LEVEL)]
        env.close()
    return out


def test_every_level_sampled(missions):
    assert len(missions) >= 90  # minigrid 3.2 registers 96 BabyAI levels


def test_round_trip_every_level(missions):
    tok = MissionTokenizer()
    for level, ms in missions.items():
        for m in ms:
            ids = tok.encode(m)
            assert tok.decode(ids) == m, level
            padded = tok.encode_padded(m)
            assert len(padded) == MAX_MISSION_TOKENS
            assert padded[: len(ids)] == ids
            assert all(i == tok.pad_id for i in padded[len(ids) :])
            assert tok.decode(padded) == m
            assert tok.decode(torch.tensor(padded)) == m


def test_measured_length_within_bound(missions):
    tok = MissionTokenizer()
    longest = max(len(tok.encode(m)) for ms in missions.values() for m in ms)
    assert 5 <= longest <= MAX_MISSION_TOKENS


def test_vocabulary_covers_grammar():
    vocab = set(VOCABULARY)
    assert VOCABULARY[0] == PAD_TOKEN and MissionTokenizer.pad_id == 0
    assert len(vocab) == len(VOCABULARY)
    assert set(COLOR_NAMES) <= vocab
    assert set(OBJ_TYPES) <= vocab
    assert {"left", "right", "front", "behind"} == set(LOC_NAMES) and set(LOC_NAMES) <= vocab
    # surface words of the verifier (ObjDesc, actions, sequencing)
    grammar = (
        "a the object in front of you behind on your go to open pick up put next and , then after"
    )
    assert set(grammar.split()) <= vocab


def _longest_desc() -> str:
    loc_surface = {"front": "in front of you", "behind": "behind you"}
    locs = [loc_surface.get(loc, f"on your {loc}") for loc in LOC_NAMES]
    loc = max(locs, key=lambda s: len(s.split()))
    return f"a {COLOR_NAMES[0]} {OBJ_TYPES[0]} {loc}"


def test_grammar_bound_is_72():
    # seq(and(putnext, putnext), and(putnext, putnext)) with the longest descriptions
    d = _longest_desc()
    put = f"put {d} next to {d}"
    conj = f"{put} and {put}"
    tok = MissionTokenizer()
    for seq in (f"{conj}, then {conj}", f"{conj} after you {conj}"):
        ids = tok.encode(seq)
        assert len(ids) == MAX_MISSION_TOKENS == 72
        assert tok.decode(tok.encode_padded(seq)) == seq


def test_unknown_word_raises():
    tok = MissionTokenizer()
    with pytest.raises(ValueError, match=r"'banana'.*'go to the banana'"):
        tok.encode("go to the banana")
    with pytest.raises(ValueError, match=re.escape("'door.'")):
        tok.encode("open the door.")


@pytest.mark.parametrize("bad", [" go to", "go  to", "go to ", "go , then", ",go"])
def test_non_round_trip_strings_raise(bad):
    with pytest.raises(ValueError):
        MissionTokenizer().encode(bad)


def test_too_long_raises():
    tok = MissionTokenizer(max_length=4)
    assert len(tok.encode_padded("go to the box")) == 4
    with pytest.raises(ValueError, match="5 tokens"):
        tok.encode_padded("go to the red box")


def test_decode_out_of_range():
    with pytest.raises(ValueError):
        MissionTokenizer().decode([len(VOCABULARY)])


_WORDS = [w for w in VOCABULARY if w not in (PAD_TOKEN, ",")]


@st.composite
def _token_sequences(draw):
    words = draw(st.lists(st.sampled_from(_WORDS), min_size=1, max_size=MAX_MISSION_TOKENS // 2))
    commas = draw(st.lists(st.booleans(), min_size=len(words), max_size=len(words)))
    out = []
    for w, c in zip(words, commas):
        out.append(w)
        if c:
            out.append(",")
    return out


@settings(max_examples=200, deadline=None, derandomize=True)
@given(_token_sequences())
def test_round_trip_property(words):
    tok = MissionTokenizer()
    ids = [VOCABULARY.index(w) for w in words]
    s = tok.decode(ids)
    assert tok.encode(s) == ids
    assert tok.decode(tok.encode(s)) == s
