"""The synthetic cohort: HU per tissue, scanner geometry, classes, determinism, caching."""

from __future__ import annotations

import csv
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mlssp_jax import nifti, synth
from mlssp_jax.config import DataConfig
from mlssp_jax.errors import InputError
from mlssp_jax.manifest import check_subjects, read_manifest

WHOLE = (slice(None),) * 3


def _first(label: int, site_is_lobar: bool, mode=synth.FULL) -> int:
    """Index of the first subject of seed 0 with this label and (non-)lobar site."""
    for index in range(100):
        _, lesion, _, _, _ = synth.sample_subject(index, label, 0, mode)
        if (lesion["site"] == "lobar") == site_is_lobar:
            return index
    raise AssertionError("no such subject")


@pytest.fixture(scope="module")
def full_subject():
    """A full-size lobar AVM subject: its sampled anatomy, grid and rendered scan."""
    index = _first(label=1, site_is_lobar=True)
    anat, lesion, grid, scanner, _ = synth.sample_subject(index, 1, 0, synth.FULL)
    hu, mask, _, facts = synth.render_subject(index, 1, 0, synth.FULL)
    depth, width = synth.ellipsoid(grid, WHOLE, (0.0, 0.0, 0.0), anat["axes_mm"])
    return {"anat": anat, "lesion": lesion, "grid": grid, "hu": hu, "mask": mask,
            "facts": facts, "depth": depth, "width": width}


def _median_hu(s, lo_mm, hi_mm, extra=True):
    """Median HU of voxels between two depths below the scalp, where slices cut squarely."""
    region = (s["depth"] > lo_mm) & (s["depth"] < hi_mm) & (s["width"] < 1.0) & extra
    assert region.sum() > 200
    return float(np.median(s["hu"][region]))


def test_air_is_minus_1000_with_4_to_6_hu_noise(full_subject):
    s = full_subject
    air = (s["depth"] < -5.0) & (s["grid"].y > 0)  # in front of the face: no headrest
    assert -1005 < np.median(s["hu"][air]) < -995
    assert 3.5 < np.std(s["hu"][air]) < 6.5


def test_scalp_skull_and_diploe_hu(full_subject):
    s, bounds = full_subject, full_subject["anat"]["bounds_mm"]
    assert 30 < _median_hu(s, bounds[0] + 1.0, bounds[1] - 1.0) < 50  # scalp
    assert 700 < _median_hu(s, bounds[1] + 0.5, bounds[2] - 0.5) < 1600  # outer table
    assert 250 < _median_hu(s, bounds[2] + 1.0, bounds[3] - 1.0) < 800  # diploe
    assert s["hu"].max() > 1000


def test_brain_tissue_and_csf_hu(full_subject):
    s, anat = full_subject, full_subject["anat"]
    brain = s["depth"] - anat["bounds_mm"][-1]
    far = np.ones_like(brain, dtype=bool)
    lesion, grid = s["lesion"], s["grid"]
    reach = lesion["axes"].max() * 1.5 + 12.0
    far &= ((grid.x - lesion["centre"][0]) ** 2 + (grid.y - lesion["centre"][1]) ** 2
            + (grid.z - lesion["centre"][2]) ** 2) > reach**2
    white = (brain > 14) & (brain < 20) & (np.abs(grid.x) > 8) & far
    assert 22 < np.median(s["hu"][white]) < 34
    structures = synth.deep_structures(anat)
    thalamus, ventricle = structures[2], structures[6]  # (centre, semi-axes, HU)
    for (centre, axes, _), lo, hi in ((thalamus, 30, 48), (ventricle, -2, 14)):
        depth, _ = synth.ellipsoid(grid, WHOLE, centre, axes)
        inside = (depth > 1.5) & far
        assert inside.sum() > 50
        assert lo < np.median(s["hu"][inside]) < hi


def test_hematoma_hu_and_volume(full_subject):
    s = full_subject
    blood = s["hu"][s["mask"].astype(bool)]
    assert 50 <= np.mean(blood) <= 85
    assert np.mean(blood) == pytest.approx(s["facts"]["mean_hu"], abs=0.01)
    voxel_ml = abs(np.linalg.det(s["grid"].affine[:3, :3])) / 1000
    assert s["facts"]["volume_ml"] == pytest.approx(s["mask"].sum() * voxel_ml, rel=1e-3)
    assert 1.5 <= s["facts"]["volume_ml"] <= 70


def test_full_size_files_are_like_converted_dicom(tmp_path):
    index = _first(label=0, site_is_lobar=False)
    facts = synth.write_subject(tmp_path, "sub-x", index, 0, seed=0, small=False)
    image_file, mask_file = tmp_path / "images/sub-x.nii.gz", tmp_path / "masks/sub-x.nii.gz"
    header = nib.load(image_file)
    assert header.get_data_dtype() == np.int16
    assert header.dataobj.slope == 1.0 and header.dataobj.inter in (0.0, -1024.0)
    image = nifti.load_image(image_file)
    spacing = image.spacing_mm
    assert 0.40 <= spacing[0] <= 0.50 and spacing[1] == pytest.approx(spacing[0])
    assert spacing[2] in (pytest.approx(4.5), pytest.approx(5.0))
    assert 20 <= image.data.shape[2] <= 40
    mask = nifti.load_mask(mask_file, like=image)  # exactly on the image grid
    assert mask.data.sum() * image.voxel_volume_ml == pytest.approx(facts["volume_ml"], rel=1e-3)
    assert facts["volume_ml"] >= 1.5 and facts["site"] != "lobar"


def test_orientations_and_tilts_vary():
    codes, tilts = set(), []
    for index in range(40):
        _, _, grid, scanner, _ = synth.sample_subject(index, index % 2, 0, synth.FULL)
        codes.add("".join(nib.aff2axcodes(grid.affine)))
        tilts.append(scanner["tilt_deg"])
    assert {"RAS", "LPS"} <= codes
    assert 0 < sum(t != 0 for t in tilts) < 40 and max(map(abs, tilts)) <= 15


def _auc(avm, other) -> float:
    """P(an AVM value > an other value), ties half."""
    a, o = np.asarray(avm, float)[:, None], np.asarray(other, float)[None, :]
    return float((a > o).mean() + 0.5 * (a == o).mean())


def test_sampled_class_features_differ_but_overlap():
    rows = {0: [], 1: []}
    for index in range(300):
        label = index % 2
        anat, lesion, _, _, _ = synth.sample_subject(index, label, 0, synth.FULL)
        rows[label].append((anat["age"], lesion["irregularity"], lesion["texture_hu"],
                            lesion["edema_mm"], lesion["site"] == "lobar",
                            np.prod(lesion["axes"]) * 4 / 3 * np.pi / 1000))
    avm, other = np.array(rows[1], float), np.array(rows[0], float)
    # age: AVM younger; irregular, heterogeneous, less edema, lobar; smaller
    for column, (lo, hi) in enumerate([(0.0, 0.2), (0.8, 0.99), (0.8, 0.99), (0.05, 0.3),
                                       (0.65, 0.9), (0.2, 0.45)]):
        assert lo < _auc(avm[:, column], other[:, column]) < hi, column
    volumes = np.concatenate([avm[:, 5], other[:, 5]])
    assert volumes.min() >= 2.0 and volumes.max() <= 62.0


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("small40") / "cohort"
    manifest = synth.generate_cohort(out, n_subjects=40, n_avm=20, seed=1, small=True)
    with open(out / synth.FACTS_NAME) as f:
        return manifest, list(csv.DictReader(f))


def test_rendered_class_features_differ_but_overlap(small_cohort):
    _, facts = small_cohort
    by_label = {label: [r for r in facts if r["label"] == str(label)] for label in (0, 1)}
    for name, lo, hi in [("depth_mm", 0.03, 0.4), ("mean_hu", 0.05, 0.45),
                         ("std_hu", 0.55, 0.97), ("volume_ml", 0.15, 0.85)]:
        avm = [float(r[name]) for r in by_label[1]]
        other = [float(r[name]) for r in by_label[0]]
        assert lo < _auc(avm, other) < hi, name
        assert min(max(avm), max(other)) > max(min(avm), min(other)), name  # ranges overlap


def test_small_lesions_fit_a_32_mm_voi(small_cohort):
    _, facts = small_cohort
    for row in facts:
        assert 0.8 <= float(row["volume_ml"]) <= 5.0
        assert float(row["extent_mm"]) <= 25.0


def test_tiny_cohort_manifest_balance_and_grids(tiny_cohort):
    subjects = read_manifest(tiny_cohort)
    assert len(subjects) == 10 and sum(s.label for s in subjects) == 5
    check_subjects(subjects)  # every mask loads on its image's grid, 0/1, non-empty
    with open(tiny_cohort.parent / synth.FACTS_NAME) as f:
        facts = {r["subject_id"]: r for r in csv.DictReader(f)}
    for subject in subjects:
        assert int(facts[subject.subject_id]["label"]) == subject.label


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_generation_is_byte_identical_across_runs(tmp_path):
    a = synth.generate_cohort(tmp_path / "a", n_subjects=3, n_avm=1, seed=5, small=True)
    b = synth.generate_cohort(tmp_path / "b", n_subjects=3, n_avm=1, seed=5, small=True,
                              workers=2)
    assert _tree(a.parent) == _tree(b.parent) and len(_tree(a.parent)) == 8
    c = synth.generate_cohort(tmp_path / "c", n_subjects=3, n_avm=1, seed=6, small=True)
    assert _tree(c.parent) != _tree(a.parent)


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    def fail(out_dir, subject_id, index, *args):
        if index == 1:
            raise RuntimeError("disk full")
        return real(out_dir, subject_id, index, *args)

    real = synth.write_subject
    monkeypatch.setattr(synth, "write_subject", fail)
    with pytest.raises(RuntimeError):
        synth.generate_cohort(tmp_path / "out", n_subjects=3, n_avm=1, small=True)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_folder_that_is_not_a_cohort(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="is not a synthetic cohort"):
        synth.generate_cohort(tmp_path, n_subjects=2, n_avm=1, small=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kwargs, message", [
    ({"n_subjects": 1}, "--subjects: must be at least 2"),
    ({"n_avm": 3}, r"--avm: must be in 0\.\.2"),
    ({"seed": -1}, "--seed: must be >= 0")])
def test_bad_options(tmp_path, kwargs, message):
    args = {"n_subjects": 2, "n_avm": 1, "seed": 0, "small": True, **kwargs}
    with pytest.raises(InputError, match=message):
        synth.generate_cohort(tmp_path / "out", **args)


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mlssp_jax.synth", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_command_line(tmp_path):
    done = _run("--out", str(tmp_path / "d"), "--subjects", "4", "--avm", "2", "--small")
    assert done.returncode == 0, done.stderr
    assert sum(s.label for s in read_manifest(tmp_path / "d" / "manifest.csv")) == 2
    bad = _run("--out", str(tmp_path / "e"), "--subjects", "3", "--avm", "7")
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == ["error: --avm: must be in 0..3 (--subjects), got 7"]
    unknown = _run("--out", str(tmp_path / "e"), "--colour", "red")
    assert unknown.returncode == 2 and len(unknown.stderr.splitlines()) == 1
    assert unknown.stderr.startswith("error: ") and not (tmp_path / "e").exists()


def test_default_manifest_is_generated_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MLSSP_JAX_CACHE", str(tmp_path / "cache"))
    calls = []
    real = synth.generate_cohort

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "generate_cohort", counting)
    cfg = DataConfig(synth_subjects=4, synth_avm=2, synth_seed=3, synth_small=True)
    results = []
    threads = [threading.Thread(target=lambda: results.append(synth.default_manifest(cfg)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and results[0] == results[1]
    assert results[0].is_relative_to(tmp_path / "cache") and results[0].is_file()
    assert synth.default_manifest(cfg) == results[0] and len(calls) == 1
    assert len(read_manifest(results[0])) == 4
    other = DataConfig(synth_subjects=4, synth_avm=2, synth_small=True,
                       cache_dir=str(tmp_path / "elsewhere"))
    assert synth.default_manifest(other).is_relative_to(tmp_path / "elsewhere")
