"""Property tests of bad input (SPEC.md, "Errors"): random corruptions of NIfTI files, of
manifests and of configs are either accepted and processed correctly, or rejected with exit
code 2, exactly one line starting ``error:`` and nothing written; never a traceback (an
exception escaping ``run_command`` fails the test). Run in-process for speed; a handful of
subprocess cases check the real command lines."""

import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import (
    HealthCheck,
    currently_in_test_context,
    event,
    example,
    given,
    settings,
)
from hypothesis import strategies as st

from mlssp_jax import config as config_lib
from mlssp_jax import manifest, preprocess, train
from mlssp_jax.cli import run_command
from mlssp_jax.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
FAST = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def sources(tiny_cohort, tmp_path_factory):
    """Two subjects of the tiny cohort as uncompressed .nii (header bytes at fixed offsets)."""
    folder = tmp_path_factory.mktemp("bad_input_sources")
    subjects = manifest.read_manifest(tiny_cohort)[:2]
    found = {}
    for s in subjects:
        for kind, path in (("image", s.image), ("mask", s.mask)):
            found[(s.subject_id, kind)] = folder / f"{s.subject_id}_{kind}.nii"
            nib.save(nib.load(str(path)), str(found[(s.subject_id, kind)]))
    return {"files": found, "ids": [s.subject_id for s in subjects],
            "labels": [s.label for s in subjects]}


def check_outcome(code: int, err: str, out: Path) -> bool:
    """True if accepted (code 0); else assert a clean rejection with nothing in ``out``."""
    assert "Traceback" not in err
    if currently_in_test_context():
        event("accepted" if code == 0 else "rejected")
    if code == 0:
        return True
    errors = [line for line in err.split("\n") if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    assert not out.exists(), sorted(out.rglob("*"))
    return False


def run_preprocess(manifest_path: Path, out: Path, capsys) -> tuple[int, str]:
    """The command in-process, on a 3 mm grid (fast, whatever size a damaged header claims)."""
    capsys.readouterr()
    code = run_command(preprocess.main, ["--data", str(manifest_path), "--out", str(out),
                                         "--workers", "1", "--set", "data.spacing_mm=3.0"])
    return code, capsys.readouterr().err


def assert_preprocessed(out: Path, ids: list[str]) -> None:
    """Every subject's npz (a finite [0, 1] image on its grid) and preprocess.json, nothing else."""
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{sid}.npz" for sid in set(ids)] + ["preprocess.json"])
    for sid in ids:
        with np.load(out / f"{sid}.npz") as npz:
            image = npz["image"]
            assert image.ndim == 3 and npz["mask"].shape == image.shape
            assert np.isfinite(image).all() and 0 <= image.min() <= image.max() <= 1


# --- NIfTI files --------------------------------------------------------------------------
HEADER_BYTES = 348
corruptions = st.one_of(
    st.lists(st.tuples(st.integers(0, HEADER_BYTES - 1), st.integers(0, 255)),
             min_size=1, max_size=6).map(lambda edits: ("header", edits)),
    st.lists(st.tuples(st.integers(HEADER_BYTES, 10**6), st.integers(0, 255)),
             min_size=1, max_size=6).map(lambda edits: ("voxels", edits)),
    st.integers(0, 400).map(lambda n: ("truncate", n)),
    st.sampled_from(["empty", "text", "gzip-garbage"]).map(lambda k: (k, None)))


def corrupt(raw: bytes, kind: str, arg) -> bytes:
    """``raw`` NIfTI bytes with one kind of damage."""
    if kind in ("header", "voxels"):
        data = bytearray(raw)
        for offset, value in arg:
            data[offset % len(data)] = value
        return bytes(data)
    if kind == "truncate":
        return raw[:arg]
    return {"empty": b"", "text": b"subject_id,image\n", "gzip-garbage": b"\x1f\x8b\x08" * 9}[kind]


@FAST
@given(damage=corruptions, which=st.sampled_from(["image", "mask"]))
def test_damaged_nifti_is_processed_or_rejected(sources, capsys, damage, which):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = ["subject_id,image,mask,label"]
        for sid, label in zip(sources["ids"], sources["labels"], strict=True):
            for kind in ("image", "mask"):
                shutil.copy(sources["files"][(sid, kind)], tmp / f"{sid}_{kind}.nii")
            rows.append(f"{sid},{sid}_image.nii,{sid}_mask.nii,{label}")
        (tmp / "manifest.csv").write_text("\n".join(rows) + "\n")
        target = tmp / f"{sources['ids'][-1]}_{which}.nii"
        target.write_bytes(corrupt(target.read_bytes(), *damage))
        code, err = run_preprocess(tmp / "manifest.csv", tmp / "out", capsys)
        if check_outcome(code, err, tmp / "out"):
            assert_preprocessed(tmp / "out", sources["ids"])
        else:
            assert str(target) in err or "manifest.csv" in err, err


# --- manifests ----------------------------------------------------------------------------
PATHS = ("good_image", "good_mask", "", "missing.nii", "folder", "manifest.csv", "../x.nii",
         "/nonexistent/a.nii.gz")
SAFE_IDS = st.sampled_from(["sub-1", "sub-2", "a.b", "A_1", " sub-3 "])
ids = st.one_of(SAFE_IDS, SAFE_IDS, SAFE_IDS,
                st.sampled_from(["../escape", ".x", "", "a/b", "sub 1", "s\u00e9"]),
                st.text(min_size=0, max_size=12),
                st.text(st.characters(codec="ascii"), min_size=129, max_size=140))
GOOD_LABELS = st.sampled_from(["0", "1", " 1"])
labels = st.one_of(GOOD_LABELS, GOOD_LABELS, GOOD_LABELS,
                   st.sampled_from(["2", "-1", "x", "", "1.0"]), st.text(max_size=4))
GOOD_IMAGES, GOOD_MASKS = st.just("good_image"), st.sampled_from(["good_mask", ""])
row = st.tuples(ids, st.one_of(GOOD_IMAGES, GOOD_IMAGES, st.sampled_from(PATHS)),
                st.one_of(GOOD_MASKS, GOOD_MASKS, st.sampled_from(PATHS)), labels)
COLUMNS = ["subject_id", "image", "mask", "label"]
layouts = st.sampled_from(["standard", "standard", "standard", "reordered", "dropped", "extra",
                           "short-row"])
encodings = st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"])


def manifest_bytes(rows, layout: str, encoding: str, folder: Path, sources) -> bytes:
    """The CSV bytes of ``rows`` (paths resolved to real files where named 'good_*')."""
    real = {"good_image": str(sources["files"][(sources["ids"][0], "image")]),
            "good_mask": str(sources["files"][(sources["ids"][0], "mask")])}
    header = list(COLUMNS)
    table = [[sid, real.get(image, image), real.get(mask, mask), label]
             for sid, image, mask, label in rows]
    if layout == "reordered":
        header, table = header[::-1], [r[::-1] for r in table]
    elif layout == "dropped":
        header, table = header[:3], [r[:3] for r in table]
    elif layout == "extra":
        header, table = header + ["notes"], [r + ["x"] for r in table]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(table if layout != "short-row" else [r[:2] for r in table])
    return text.getvalue().encode(encoding, errors="replace")


@settings(FAST, max_examples=100)
@example(rows=[("sub-1", "good_image", "good_mask", "1"), (" b ", "good_image", "", "0")],
         layout="reordered", encoding="utf-8-sig")
@given(rows=st.lists(row, min_size=0, max_size=2), layout=layouts, encoding=encodings)
def test_damaged_manifest_is_processed_or_rejected(sources, capsys, rows, layout, encoding):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "folder").mkdir()
        path = tmp / "manifest.csv"
        path.write_bytes(manifest_bytes(rows, layout, encoding, tmp, sources))
        code, err = run_preprocess(path, tmp / "out", capsys)
        if check_outcome(code, err, tmp / "out"):
            subjects = manifest.read_manifest(path, require_masks=False)
            assert [s.subject_id for s in subjects] == [r[0].strip() for r in rows]
            assert [s.label for s in subjects] == [int(r[3].strip()) for r in rows]
            assert_preprocessed(tmp / "out", [s.subject_id for s in subjects])
        else:  # names the manifest or a file it lists
            assert "error: /" in err, err


# --- configs ------------------------------------------------------------------------------
DEFAULTS = config_lib.to_dict(config_lib.Config())
FIELDS = [(section, key) for section, values in DEFAULTS.items() for key in values]
WRONG_TYPE = st.one_of(st.text(max_size=8), st.lists(st.integers(), max_size=2),
                      st.integers(-10**20, 10**20), st.booleans())


def value_for(default):
    """A value for a field with this default: mostly of its type (in range or not)."""
    if isinstance(default, bool):
        typed = st.booleans()
    elif isinstance(default, int):
        typed = st.integers(min(-2, 2 * default - 2), max(2, 2 * default + 2))
    elif isinstance(default, float):
        low, high = sorted((2 * default - 1.0, 2 * default + 1.0))
        typed = st.one_of(st.floats(min(-1.0, low), max(1.0, high)), st.sampled_from(
            [default, 0.0, float("nan"), float("inf"), -float("inf")]))
    else:
        typed = st.sampled_from([default, "auto", "mlssp", "ynet", "xla", "float32", ""])
    return st.one_of(*[typed] * 5, WRONG_TYPE)


field_edit = st.sampled_from(FIELDS).flatmap(
    lambda f: st.tuples(st.just(f), value_for(DEFAULTS[f[0]][f[1]])))


def toml_value(value) -> str:
    if isinstance(value, float) and not np.isfinite(value):
        return "nan" if np.isnan(value) else ("inf" if value > 0 else "-inf")
    return config_lib._toml_value(value) if not isinstance(value, list) else repr(value)


unknown_edit = st.tuples(st.sampled_from([("train", "frobnicate"), ("nosuch", "key")]),
                         WRONG_TYPE)
edits = st.lists(st.one_of(*[field_edit] * 8, unknown_edit), min_size=1, max_size=3)


@settings(FAST, max_examples=100)
@example(edits=[(("train", "epochs"), 3), (("model", "width"), 8)], garble=None)
@given(edits=edits, garble=st.one_of(st.none(), st.none(), st.none(), st.text(max_size=6)))
def test_damaged_config_is_accepted_or_rejected(capsys, edits, garble):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tables: dict[str, dict[str, str]] = {}
        for (section, key), value in edits:
            tables.setdefault(section, {})[key] = toml_value(value)
        text = "".join(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
                       for section, keys in tables.items()) + (garble or "")
        path = tmp / "c.toml"
        path.write_bytes(text.encode("utf-8", errors="replace"))
        capsys.readouterr()
        # --fold x is refused right after the config is read: training never starts
        code = run_command(train.main, ["--config", str(path), "--workdir", str(tmp / "w"),
                                        "--data", str(tmp / "m.csv"), "--fold", "x"])
        err = capsys.readouterr().err
        assert not check_outcome(code, err, tmp / "w")
        event("config accepted" if err.startswith("error: --fold") else "config rejected")
        if err.startswith("error: --fold"):  # accepted: loads, validates, round-trips
            cfg = config_lib.load(path)
            again = tmp / "again.toml"
            again.write_text(config_lib.to_toml(cfg))
            assert config_lib.load(again) == cfg
            assert all(np.isfinite(v) for v in _floats(cfg))
        else:
            assert err.startswith(f"error: {path}"), err
            with pytest.raises(InputError):
                config_lib.load(path)


def _floats(cfg) -> list[float]:
    return [v for section in config_lib.to_dict(cfg).values() for v in section.values()
            if isinstance(v, float)]


# --- a handful of real command lines -----------------------------------------------------
def _command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("case", ["preprocess-header", "train-config", "predict-empty-scan"])
def test_command_line_rejections(case, sources, tmp_path):
    sid = sources["ids"][-1]
    image = tmp_path / "scan.nii"
    image.write_bytes(corrupt(sources["files"][(sid, "image")].read_bytes(), "header",
                              [(70, 0x00), (71, 0x07)]))  # datatype 1792: complex128
    (tmp_path / "m.csv").write_text(f"subject_id,image,mask,label\n{sid},scan.nii,,1\n")
    (tmp_path / "c.toml").write_text("[train]\nepochs = 0\n")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    args = {"preprocess-header": ("mlssp_jax.preprocess", "--data", "m.csv", "--out", "out"),
            "train-config": ("mlssp_jax.train", "--config", "c.toml", "--data", "m.csv",
                             "--workdir", "out", "--fold", "0"),
            "predict-empty-scan": ("mlssp_jax.predict", "--workdir", "nowhere", "--image",
                                   "empty.nii.gz", "--out", "out")}[case]
    before = sorted(tmp_path.rglob("*"))
    done = _command(*args, cwd=tmp_path)
    check_outcome(done.returncode, done.stderr, tmp_path / "out")
    assert done.returncode == 2 and sorted(tmp_path.rglob("*")) == before
    named = {"preprocess-header": "scan.nii", "train-config": "train.epochs",
             "predict-empty-scan": "empty.nii.gz"}[case]
    assert named in done.stderr.split("error:")[1], done.stderr
