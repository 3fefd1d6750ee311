"""Atomic writes: complete or absent, never half-written."""

import pytest

from mlssp_jax import fileio


def test_atomic_path_renames_on_success(tmp_path):
    target = tmp_path / "sub" / "x.nii.gz"
    with fileio.atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == target.parent
        tmp.write_bytes(b"data")
        assert not target.exists()
    assert target.read_bytes() == b"data"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.nii.gz"]


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), fileio.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_atomic_dir_replaces_whole(tmp_path):
    target = tmp_path / "out"
    with fileio.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError), fileio.atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
        raise ValueError
    assert [p.name for p in target.iterdir()] == ["a"]
    with fileio.atomic_dir(target) as tmp:
        (tmp / "c").write_text("3")
    assert [p.name for p in target.iterdir()] == ["c"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
