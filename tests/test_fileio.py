"""Atomic writes: complete or absent, never half-written; safe names; staying inside a folder."""

import pytest

from mlssp_jax import fileio
from mlssp_jax.errors import InputError
from mlssp_jax.fileio import inside, safe_name_problem, staged_outputs


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


@pytest.mark.parametrize("name", ["sub-001", "a", "A.b_c-9", "x" * 128])
def test_safe_names_pass(name):
    assert safe_name_problem(name) is None


@pytest.mark.parametrize("name, why", [("", "empty"), (".hidden", "starts with '.'"),
                                       ("../escape", "starts with '.'"), ("a/b", "only"),
                                       ("sub 1", "only"), ("sub\n1", "only"), ("é", "only"),
                                       ("x" * 129, "129 characters"), ("a\\b", "only")])
def test_unsafe_names_say_why(name, why):
    assert why in safe_name_problem(name)


def test_inside_refuses_paths_leaving_the_folder(tmp_path):
    out = tmp_path / "out"
    assert inside(out, out / "a.npz") == out / "a.npz"
    for bad in (out / ".." / "escape.npz", tmp_path / "x", out):
        with pytest.raises(InputError, match="outside the output folder"):
            inside(out, bad)
    out.mkdir()
    (out / "link").symlink_to(tmp_path)
    with pytest.raises(InputError, match="outside"):
        inside(out, out / "link" / "x.npz")


def test_staged_outputs_move_in_on_success_only(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "cached.npz").write_text("old")
    with staged_outputs(out) as stage:
        (stage / "new.npz").write_text("new")
        assert not (out / "new.npz").exists()  # nothing visible before the block ends
    assert sorted(p.name for p in out.iterdir()) == ["cached.npz", "new.npz"]
    with pytest.raises(RuntimeError), staged_outputs(out) as stage:
        (stage / "cached.npz").write_text("replaced")
        (stage / "other.npz").write_text("x")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in out.iterdir()) == ["cached.npz", "new.npz"]
    assert (out / "cached.npz").read_text() == "old"


def test_staged_outputs_remove_a_folder_they_created(tmp_path):
    with pytest.raises(RuntimeError), staged_outputs(tmp_path / "new") as stage:
        (stage / "a").write_text("x")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
