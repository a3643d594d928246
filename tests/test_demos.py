"""Bot demonstrations: on-disk buffer, commit protocol, sequence sampling, BC smoke test."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from mop_torchrl.babyai.demos import DemoError, generate_demos, open_demos, sample_sequences
from mop_torchrl.babyai.demos import produce as produce_module
from mop_torchrl.babyai.demos import writer as writer_module
from mop_torchrl.cli import main

LEVEL = "GoToRedBall"


def _episodes(path: Path) -> list[dict[str, torch.Tensor]]:
    """Committed episodes as dicts of tensors, checking the per-episode invariants."""
    buffer, meta = open_demos(path)
    rows = buffer.storage[: len(buffer)]
    ids = rows["episode"]
    assert ids.tolist() == sorted(ids.tolist())  # episodes are contiguous, in id order
    assert torch.unique(ids).tolist() == list(range(meta["episodes"]))
    out = []
    for e in range(meta["episodes"]):
        ep = rows[ids == e]
        n = ep.shape[0]
        assert ep["step"].tolist() == list(range(n))
        assert ep["is_init"].squeeze(-1).tolist() == [True] + [False] * (n - 1)
        assert ep["next", "done"].squeeze(-1).tolist() == [False] * (n - 1) + [True]
        assert (ep["mission"] == ep["mission"][0]).all()
        out.append(ep)
    return out


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demos")
    summary = generate_demos(LEVEL, 6, out, num_workers=2, seed=0, progress=False, chunk_len=8)
    assert summary["episodes"] == 6 and summary["total_episodes"] == 6
    return out


def test_written_episodes_are_complete_and_labels_are_the_actions(demo_dir):
    episodes = _episodes(demo_dir)
    assert len(episodes) == 6
    _, meta = open_demos(demo_dir)
    assert meta["level"] == "BabyAI-GoToRedBall-v0" and meta["frames"] == sum(
        ep.shape[0] for ep in episodes
    )
    for ep in episodes:
        labelled = ep["expert_action"] >= 0
        assert (ep["action"][labelled] == ep["expert_action"][labelled]).all()
        assert bool(ep["next", "terminated"][-1]) and float(ep["next", "reward"][-1]) > 0


def test_sample_sequences(demo_dir):
    buffer, _ = open_demos(demo_dir)
    torch.manual_seed(3)
    td = sample_sequences(buffer, batch_slices=16, slice_len=8)
    assert td.batch_size == torch.Size([16, 8])
    assert td["mission"].dtype == td["expert_action"].dtype == torch.int64
    is_init = td["is_init"].squeeze(-1)
    assert is_init[:, 0].all() and not is_init[:, 1:].any()
    mask = td["collector", "mask"]
    assert mask[:, 0].all()
    assert (mask.long().diff(dim=1) <= 0).all()  # real steps first, then padding
    for row, m in zip(td.unbind(0), mask.unbind(0)):
        real = row[m]
        assert (real["episode"] == real["episode"][0]).all()
        assert (real["step"].diff() == 1).all()
        labelled = real["expert_action"] >= 0
        assert (real["action"][labelled] == real["expert_action"][labelled]).all()
        assert (row["expert_action"][~m] == -1).all() and (row["episode"][~m] == -1).all()
    # GoToRedBall episodes are shorter than 8 steps on average: padding happens
    assert not mask.all()
    torch.manual_seed(3)
    again = sample_sequences(buffer, batch_slices=16, slice_len=8)
    assert (again == td).all()
    # a slice_len of 2 re-creates the sampler and gives windows inside episodes
    short = sample_sequences(buffer, batch_slices=4, slice_len=2)
    assert short.batch_size == torch.Size([4, 2])


@pytest.mark.parametrize("backend", ["collector", "parallel_env"])
@pytest.mark.subprocess
@pytest.mark.slow
def test_torchrl_backends(backend, tmp_path):
    out = tmp_path / "demos"
    summary = generate_demos(
        LEVEL, 3, out, num_workers=2, seed=1, progress=False, chunk_len=8, backend=backend
    )
    assert summary["episodes"] == 3
    for ep in _episodes(out):
        labelled = ep["expert_action"] >= 0
        assert (ep["action"][labelled] == ep["expert_action"][labelled]).all()


def test_append_grows_with_new_ids_and_seeds(demo_dir, tmp_path, monkeypatch):
    out = tmp_path / "demos"
    shutil.copytree(demo_dir, out)
    before = _episodes(out)
    monkeypatch.setattr(writer_module, "_MIN_CAPACITY", 16)
    old_meta = json.loads((out / "demos.json").read_text())
    summary = generate_demos(LEVEL, 12, out, num_workers=1, seed=0, progress=False, chunk_len=8)
    assert summary["total_episodes"] == 18
    after = _episodes(out)
    assert len(after) == 18
    for a, b in zip(before, after):  # existing episodes untouched (also across a growth)
        assert (a == b).all()
    meta = json.loads((out / "demos.json").read_text())
    assert [r["first_episode"] for r in meta["runs"]] == [0, 6]
    if meta["capacity"] > old_meta["capacity"]:
        assert meta["storage"] != old_meta["storage"]
        assert not (out / old_meta["storage"]).exists()
    # same seed, but the new episodes do not replay the first ones
    assert not all(torch.equal(after[i]["image"][0], after[6 + i]["image"][0]) for i in range(3))


def test_interrupted_run_keeps_complete_episodes(tmp_path, monkeypatch):
    out = tmp_path / "demos"
    real_write = writer_module.write_meta
    calls = {"n": 0}

    def flaky_write(path, data):
        calls["n"] += 1
        if calls["n"] == 4:  # after the rows of a batch are written, before its commit
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(writer_module, "write_meta", flaky_write)
    with pytest.raises(KeyboardInterrupt):
        generate_demos(
            LEVEL, 20, out, num_workers=1, progress=False, chunk_len=8, backend="collector"
        )
    committed = _episodes(out)
    assert 0 < len(committed) < 20
    orphan = out / ".demos.json.x1y2.tmp"  # what a kill inside the atomic write leaves
    orphan.write_text("{")
    # the next run overwrites the uncommitted rows, continues the ids, removes the orphan
    monkeypatch.setattr(writer_module, "write_meta", real_write)
    generate_demos(LEVEL, 2, out, num_workers=1, progress=False, chunk_len=8)
    assert len(_episodes(out)) == len(committed) + 2
    assert not orphan.exists()


def test_corrupt_and_mismatched_dirs(demo_dir, tmp_path):
    with pytest.raises(DemoError, match=r"demos\.json is missing"):
        open_demos(tmp_path)
    out = tmp_path / "demos"
    shutil.copytree(demo_dir, out)
    with pytest.raises(DemoError, match="holds demos of BabyAI-GoToRedBall-v0"):
        generate_demos("GoToLocal", 1, out, num_workers=1, progress=False)
    meta_path = out / "demos.json"
    meta = json.loads(meta_path.read_text())

    def broken(**changes) -> Path:
        meta_path.write_text(json.dumps({**meta, **changes}))
        return out

    with pytest.raises(DemoError, match="format version"):
        open_demos(broken(format_version=99))
    keys = {**meta["keys"], "image": {"shape": [5, 5, 3], "dtype": "uint8"}}
    with pytest.raises(DemoError, match="keys/shapes"):
        open_demos(broken(keys=keys))
    with pytest.raises(DemoError, match="last committed frame"):
        open_demos(broken(episodes=meta["episodes"] + 1))
    with pytest.raises(DemoError, match="cannot load the demo storage"):
        open_demos(broken(storage="storage-7"))
    meta_path.write_text('{"format_version": 1, "lev')
    with pytest.raises(DemoError, match="corrupt"):
        open_demos(out)
    meta_path.write_text(json.dumps(meta))
    open_demos(out)  # restored
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    with pytest.raises(DemoError, match="not empty"):
        generate_demos(LEVEL, 1, tmp_path / "other", num_workers=1, progress=False)


def test_cli_demos(tmp_path, capsys):
    main(["demos", "--level", LEVEL, "--episodes", "2", "--out", str(tmp_path), "--workers", "1"])
    assert "wrote 2 episodes" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["demos", "--level", "GoToLocal", "--episodes", "1", "--out", str(tmp_path)])
    assert exit_info.value.code == 1 and "holds demos of" in capsys.readouterr().err


def test_make_babyai_env_appends_policy_primers():
    from tensordict.nn import TensorDictSequential
    from torchrl.modules import GRUModule

    from mop_torchrl.babyai.envs import make_babyai_env

    gru = GRUModule(input_size=4, hidden_size=8, in_key="x", out_key="y")
    policy = TensorDictSequential(gru)
    env = make_babyai_env(LEVEL, policy=policy)
    assert "recurrent_state" in env.observation_spec
    td = env.reset()
    assert td["recurrent_state"].shape == (1, 8)
    assert "recurrent_state" not in make_babyai_env(LEVEL).observation_spec
    batched = make_babyai_env(LEVEL, num_envs=2, parallel=False, policy=policy)
    assert batched.reset()["recurrent_state"].shape == (2, 1, 8)


def test_bc_smoke(demo_dir, tiny_config):
    from mop_torchrl.train import train

    config = tiny_config(
        algo="bc",
        demos=str(demo_dir),
        task_id="BabyAI-GoToRedBall-v0",
        num_updates=2,
        batch_slices=4,
        slice_len=8,
    )
    run_dir = train(config)
    assert (Path(run_dir) / "checkpoint.pt").exists()


def _unpickling_fails():
    raise pickle.UnpicklingError("garbled episode")


class _Garbled:
    def __reduce__(self):
        return (_unpickling_fails, ())


def _garbling_worker(level, env_seed, act_seed, episodes, stop):  # pragma: no cover - subprocess
    episodes.put(_Garbled())
    stop.wait(60)


def test_unreadable_worker_message_is_an_error_not_an_empty_queue(tmp_path, monkeypatch):
    monkeypatch.setattr(produce_module, "_gym_worker", _garbling_worker)
    with pytest.raises(pickle.UnpicklingError, match="garbled episode"):
        generate_demos(LEVEL, 1, tmp_path / "demos", num_workers=1, progress=False)


def test_truncated_storage_is_refused_without_writing(demo_dir, tmp_path):
    out = tmp_path / "demos"
    shutil.copytree(demo_dir, out)
    _, meta = open_demos(out)
    image = out / meta["storage"] / "image.memmap"
    os.truncate(image, 1000)
    with pytest.raises(DemoError, match=r"image\.memmap has 1000 bytes"):
        open_demos(out)
    with pytest.raises(DemoError, match="truncated"):
        generate_demos(LEVEL, 1, out, num_workers=1, progress=False)
    assert image.stat().st_size == 1000
    shutil.rmtree(out)
    shutil.copytree(demo_dir, out)
    (out / meta["storage"] / "next" / "done.memmap").unlink()
    with pytest.raises(DemoError, match=r"done\.memmap is missing"):
        open_demos(out)
