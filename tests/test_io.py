"""The shared atomic writer: a failed or interrupted write leaves the previous file intact."""

from __future__ import annotations

import pytest

from mop_torchrl.io import atomic_write, atomic_write_bytes, remove_orphan_temps


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = atomic_write_bytes(tmp_path / "sub" / "state.bin", b"old")
    assert path.read_bytes() == b"old"

    def torn(f):
        f.write(b"half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, torn)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.bin"]
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"


def test_remove_orphan_temps_only_touches_its_target(tmp_path):
    for name in (".a.json.1.tmp", ".a.json.2.tmp", ".b.json.1.tmp", "a.json"):
        (tmp_path / name).write_text("x")
    removed = remove_orphan_temps(tmp_path / "a.json")
    assert [p.name for p in removed] == [".a.json.1.tmp", ".a.json.2.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.json.1.tmp", "a.json"]
