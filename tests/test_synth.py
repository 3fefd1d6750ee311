"""The synthetic cohort: HU per tissue, scanner geometry and storage, presets, classes, --small,
determinism, caching, command line."""

from __future__ import annotations

import csv
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mlssp_jax import config, nifti, synth
from mlssp_jax.config import DataConfig
from mlssp_jax.errors import InputError
from mlssp_jax.manifest import check_subjects, read_manifest
from mlssp_jax.synth import anatomy, cohort, geometry

WHOLE = (slice(None),) * 3
DEFAULT, SHIFTED = synth.preset("default"), synth.preset("shifted")


def _first(label: int, lobar: bool, settings=DEFAULT, min_spacing_mm: float = 0.0) -> int:
    """Index of the first subject of seed 0 with this label, (non-)lobar site and spacing."""
    for index in range(200):
        _, lesion, _, scanner, _ = synth.sample_subject(index, label, 0, settings)
        if (lesion["site"] == "lobar") == lobar and scanner["spacing_mm"] >= min_spacing_mm:
            return index
    raise AssertionError("no such subject")


def _sampled(settings, n: int = 300) -> list[tuple[dict, dict, dict]]:
    """``(anatomy, lesion, scanner)`` of subjects 0..n-1 of seed 0 (labels alternate)."""
    rows = []
    for index in range(n):
        anat, lesion, _, scanner, _ = synth.sample_subject(index, index % 2, 0, settings)
        rows.append((anat, lesion, scanner))
    return rows


@pytest.fixture(scope="module")
def full_subject():
    """A full-size lobar AVM subject (a coarse one of the full-size range, for speed)."""
    index = _first(label=1, lobar=True, min_spacing_mm=0.9)
    anat, lesion, grid, scanner, _ = synth.sample_subject(index, 1, 0, DEFAULT)
    hu, mask, _, facts = synth.render_subject(index, 1, 0, DEFAULT)
    depth, width = geometry.ellipsoid(grid, WHOLE, (0.0, 0.0, 0.0), anat["axes_mm"])
    return {"anat": anat, "lesion": lesion, "grid": grid, "hu": hu, "mask": mask,
            "facts": facts, "depth": depth, "width": width, "index": index}


def _median_hu(s, lo_mm, hi_mm):
    """Median HU between two depths below the scalp, in the vault, where slices cut squarely."""
    region = ((s["depth"] > lo_mm) & (s["depth"] < hi_mm) & (s["width"] < 1.2)
              & (s["grid"].z > 10.0))
    assert region.sum() > 200
    return float(np.median(s["hu"][region]))


def test_air_is_minus_1000_with_the_subjects_noise(full_subject):
    s = full_subject
    air = (s["depth"] < -5.0) & (s["grid"].y > 0) & (s["grid"].z > 0)  # in front: no headrest
    assert -1003 < np.median(s["hu"][air]) < -997
    assert np.std(s["hu"][air]) == pytest.approx(s["facts"]["noise_hu"], rel=0.15)
    assert 3.0 <= s["facts"]["noise_hu"] <= 8.0


def test_scalp_skull_and_diploe_hu(full_subject):
    s, anat = full_subject, full_subject["anat"]
    bounds, layer = anat["bounds_mm"], anat["layer_hu"]
    assert _median_hu(s, bounds[0] + 1.0, bounds[1] - 1.0) == pytest.approx(layer[0], abs=4)
    assert 600 < _median_hu(s, bounds[1] + 0.3, bounds[2] - 0.3) < 1900  # outer table
    assert _median_hu(s, bounds[2] + 1.0, bounds[3] - 1.0) == pytest.approx(layer[2], rel=0.25)
    assert 250 <= layer[2] <= 700 and s["hu"].max() > 700


def test_brain_tissue_and_csf_hu(full_subject):
    s, anat, grid, lesion = (full_subject[k] for k in ("anat", "anat", "grid", "lesion"))
    s = full_subject
    brain = s["depth"] - anat["bounds_mm"][-1]
    reach = lesion["axes"].max() * 1.5 + 12.0
    far = ((grid.x - lesion["centre"][0]) ** 2 + (grid.y - lesion["centre"][1]) ** 2
           + (grid.z - lesion["centre"][2]) ** 2) > reach**2
    white = (brain > 14) & (brain < 20) & (np.abs(grid.x) > 8) & (grid.z > 10) & far
    assert np.median(s["hu"][white]) == pytest.approx(anat["white_hu"], abs=3)
    assert 22 - 1 <= anat["white_hu"] <= 32 and 35 <= anat["grey_hu"] <= 45
    structures = anatomy.deep_structures(anat)
    thalamus, ventricle = structures[2], structures[6]  # (centre, semi-axes, HU)
    for centre, axes, value in (thalamus, ventricle):
        depth, _ = geometry.ellipsoid(grid, WHOLE, centre, axes)
        inside = (depth > 1.5) & far
        assert inside.sum() > 50
        assert np.median(s["hu"][inside]) == pytest.approx(value, abs=4)


def test_hematoma_hu_and_volume(full_subject):
    s = full_subject
    blood = s["hu"][s["mask"].astype(bool)]
    assert 45 <= np.mean(blood) <= 95
    assert np.mean(blood) == pytest.approx(s["facts"]["mean_hu"], abs=0.01)
    voxel_ml = abs(np.linalg.det(s["grid"].affine[:3, :3])) / 1000
    assert s["facts"]["volume_ml"] == pytest.approx(s["mask"].sum() * voxel_ml, rel=1e-3)
    assert s["facts"]["volume_ml"] == pytest.approx(s["lesion"]["nominal_ml"], rel=0.25)


def test_skull_base_neck_and_headrest_are_drawn(full_subject):
    s, anat, grid = full_subject, full_subject["anat"], full_subject["grid"]
    floor, _ = anatomy.floor_distance(grid, anat)
    band = (floor < -1.5) & (floor > -anat["base_mm"] + 1.5) & (s["depth"] > 8)
    assert np.median(s["hu"][band]) > 500  # skull-base bone under the brain
    below = (floor < -anat["base_mm"] - 3) & (s["depth"] > 8)
    assert (s["hu"][below] < -500).mean() > 0.01  # sinuses, airway
    assert np.median(s["hu"][below]) > 0  # face and neck soft tissue
    behind = (grid.y < -anat["axes_mm"][1] - anat["headrest_gap_mm"] - 1.0) & (
        grid.y > -anat["axes_mm"][1] - anat["headrest_gap_mm"] - anat["headrest_mm"] + 1.0) & (
        np.abs(grid.x - anat["headrest_shift_mm"]) < 20) & (grid.z > 0)
    if anat["headrest_curve"] == 0.0:
        contrast = (np.median(s["hu"][behind]) + 1000) / (anat["headrest_hu"] + 1000)
        assert 0.9 < contrast < 1.02  # a thin plate: partial volume lowers it a little


def test_full_size_files_like_converted_dicom_or_unscaled(tmp_path):
    index = _first(label=0, lobar=False, min_spacing_mm=0.9)
    facts = synth.write_subject(tmp_path, "sub-x", index, 0, seed=0, small=False)
    image_file, mask_file = tmp_path / "images/sub-x.nii.gz", tmp_path / "masks/sub-x.nii.gz"
    header = nib.load(image_file)
    assert header.get_data_dtype() == np.int16
    slope, inter = synth.scanner.STORAGE[facts["storage"]]
    if slope is None:
        assert np.isnan(header.header["scl_slope"]) or header.header["scl_slope"] == 0
    else:
        assert header.dataobj.slope == slope and header.dataobj.inter == inter
    image = nifti.load_image(image_file)
    spacing = image.spacing_mm
    assert 0.40 <= spacing[0] <= 1.0 and spacing[1] == pytest.approx(spacing[0])
    assert facts["slice_mm"] in DEFAULT.slice_mm
    assert image.data.min() >= -1024 and image.data.max() > 700
    mask = nifti.load_mask(mask_file, like=image)  # exactly on the image grid
    assert mask.data.sum() * image.voxel_volume_ml == pytest.approx(facts["volume_ml"], rel=1e-3)
    assert facts["site"] != "lobar"


def test_scanner_geometry_storage_and_coverage_vary():
    rows = _sampled(DEFAULT, 80)
    codes = {"".join(nib.aff2axcodes(synth.sample_subject(i, 0, 0, DEFAULT)[2].affine))
             for i in range(40)}
    assert {"RAS", "LPS"} <= codes and len(codes) >= 4
    scanners = [r[2] for r in rows]
    tilts = [sc["tilt_deg"] for sc in scanners]
    assert 0 < sum(t != 0 for t in tilts) < 80 and max(map(abs, tilts)) <= 20
    assert {sc["storage"] for sc in scanners} == set(synth.scanner.STORAGE)
    assert {sc["slice_mm"] for sc in scanners} == set(DEFAULT.slice_mm)
    spacing = [sc["spacing_mm"] for sc in scanners]
    assert min(spacing) < 0.5 and max(spacing) > 0.9
    assert len({sc["coverage"] for sc in scanners}) >= 4
    widths = [2 * r[0]["axes_mm"][0] for r in rows]
    assert 130 < min(widths) < max(widths) - 10 and max(widths) < 170  # adult heads, varied


def _auc(avm, other) -> float:
    """P(an AVM value > an other value), ties half."""
    a, o = np.asarray(avm, float)[:, None], np.asarray(other, float)[None, :]
    return float((a > o).mean() + 0.5 * (a == o).mean())


def test_sampled_class_features_differ_but_overlap():
    rows = {0: [], 1: []}
    for index, (anat, lesion, _) in enumerate(_sampled(DEFAULT)):
        rows[index % 2].append((anat["age"], lesion["irregularity"], lesion["texture_hu"],
                                lesion["edema_mm"], lesion["site"] == "lobar",
                                lesion["nominal_ml"]))
    avm, other = np.array(rows[1], float), np.array(rows[0], float)
    # age: AVM younger; irregular, heterogeneous, less edema, lobar; smaller
    for column, (lo, hi) in enumerate([(0.0, 0.2), (0.8, 0.99), (0.8, 0.99), (0.05, 0.3),
                                       (0.65, 0.9), (0.25, 0.48)]):
        assert lo < _auc(avm[:, column], other[:, column]) < hi, column


def test_lesion_volumes_span_the_range_with_superficial_and_skull_base_ones():
    rows = _sampled(DEFAULT)
    volumes = np.array([lesion["nominal_ml"] for _, lesion, _ in rows])
    assert volumes.min() >= 2.0 and volumes.max() <= 80.0
    assert volumes.min() < 3.0 and volumes.max() > 60.0 and 8 < np.median(volumes) < 20
    lobar = [(anat, lesion) for anat, lesion, _ in rows if lesion["site"] == "lobar"]
    reach = [geometry.head_depth(les["centre"], a["axes_mm"]) - a["bounds_mm"][4]
             - les["axes"].max() for a, les in lobar]
    assert sum(r < 0 for r in reach) > 20  # would cross the inner table: clipped against it
    low = [les["centre"][2] - les["axes"].max() < a["floor_mm"][2] + 5 for a, les in lobar]
    assert sum(low) >= 5  # temporal ones down to the middle-fossa floor


def test_presets_differ_in_tissue_noise_blur_slices_and_lesions():
    rows = {name: _sampled(synth.preset(name), 100) for name in ("default", "shifted")}

    def mean(name, get):
        return float(np.mean([get(*row) for row in rows[name]]))

    for get, gap in [(lambda a, les, sc: a["grey_hu"], 3.0),
                     (lambda a, les, sc: a["white_hu"], 3.0),
                     (lambda a, les, sc: sc["noise_hu"], 2.0),
                     (lambda a, les, sc: sc["blur_mm"], 0.2),
                     (lambda a, les, sc: np.log(les["nominal_ml"]), 0.2)]:
        assert abs(mean("default", get) - mean("shifted", get)) > gap
    slices = {name: {sc["slice_mm"] for _, _, sc in rows[name]} for name in rows}
    assert slices["default"] != slices["shifted"]
    assert config.SYNTH_PRESETS == tuple(synth.PRESETS)


def test_small_is_a_coarse_scan_of_the_same_normal_size_head():
    small = synth.for_scan(DEFAULT, small=True)
    for index in range(6):
        anat, lesion, grid, scanner, _ = synth.sample_subject(index, index % 2, 0, small)
        full = synth.sample_subject(index, index % 2, 0, DEFAULT)
        np.testing.assert_allclose(anat["axes_mm"], full[0]["axes_mm"])
        assert lesion["nominal_ml"] == full[1]["nominal_ml"]
        assert 2.0 <= scanner["spacing_mm"] <= 3.0 and scanner["slice_mm"] == 5.0


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("small30") / "cohort"
    manifest = synth.generate_cohort(out, n_subjects=30, n_avm=15, seed=1, small=True)
    with open(out / synth.FACTS_NAME) as f:
        return manifest, list(csv.DictReader(f))


def test_rendered_class_features_differ_but_overlap(small_cohort):
    _, facts = small_cohort
    by_label = {label: [r for r in facts if r["label"] == str(label)] for label in (0, 1)}
    for name, lo, hi in [("depth_mm", 0.03, 0.45), ("mean_hu", 0.05, 0.45),
                         ("std_hu", 0.55, 0.97), ("volume_ml", 0.1, 0.85)]:
        avm = [float(r[name]) for r in by_label[1]]
        other = [float(r[name]) for r in by_label[0]]
        assert lo < _auc(avm, other) < hi, name
        assert min(max(avm), max(other)) > max(min(avm), min(other)), name  # ranges overlap


def test_small_cohort_facts(small_cohort):
    manifest, facts = small_cohort
    assert list(facts[0]) == list(synth.FACT_FIELDS)
    volumes = [float(r["volume_ml"]) for r in facts]
    assert min(volumes) < 5.0 and max(volumes) > 30.0
    for row in facts:
        assert row["preset"] == "default" and float(row["slice_mm"]) == 5.0
        assert 130 < float(row["head_mm"].split("x")[0]) < 170  # normal adult head width
        assert abs(float(row["volume_ml"]) / float(row["nominal_ml"]) - 1) < 0.5


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
    first = "images/sub-001.nii.gz"
    c = synth.generate_cohort(tmp_path / "c", n_subjects=3, n_avm=1, seed=6, small=True)
    assert _tree(c.parent)[first] != _tree(a.parent)[first]
    d = synth.generate_cohort(tmp_path / "d", n_subjects=3, n_avm=1, seed=5, small=True,
                              preset_name="shifted")
    assert _tree(d.parent)["manifest.csv"] == _tree(a.parent)["manifest.csv"]
    assert _tree(d.parent)[first] != _tree(a.parent)[first]


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    def fail(out_dir, subject_id, index, *args):
        if index == 1:
            raise RuntimeError("disk full")
        return real(out_dir, subject_id, index, *args)

    real = cohort.write_subject
    monkeypatch.setattr(cohort, "write_subject", fail)
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
    ({"seed": -1}, "--seed: must be >= 0"),
    ({"preset_name": "sharp"}, "--preset: must be one of default, shifted, got 'sharp'")])
def test_bad_options(tmp_path, kwargs, message):
    args = {"n_subjects": 2, "n_avm": 1, "seed": 0, "small": True, **kwargs}
    with pytest.raises(InputError, match=message):
        synth.generate_cohort(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mlssp_jax.synth", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_command_line(tmp_path):
    done = _run("--out", str(tmp_path / "d"), "--subjects", "2", "--avm", "1", "--small",
                "--preset", "shifted")
    assert done.returncode == 0, done.stderr
    assert sum(s.label for s in read_manifest(tmp_path / "d" / "manifest.csv")) == 1
    with open(tmp_path / "d" / synth.FACTS_NAME) as f:
        assert {r["preset"] for r in csv.DictReader(f)} == {"shifted"}
    for args, line in [(("--subjects", "3", "--avm", "7"),
                        "error: --avm: must be in 0..3 (--subjects), got 7"),
                       (("--preset", "sharp"),
                        "error: --preset: must be one of default, shifted, got 'sharp'")]:
        bad = _run("--out", str(tmp_path / "e"), *args)
        assert bad.returncode == 2 and bad.stderr.splitlines() == [line]
    unknown = _run("--out", str(tmp_path / "e"), "--colour", "red")
    assert unknown.returncode == 2 and len(unknown.stderr.splitlines()) == 1
    assert unknown.stderr.startswith("error: ") and not (tmp_path / "e").exists()


def test_default_manifest_is_generated_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MLSSP_JAX_CACHE", str(tmp_path / "cache"))
    calls = []
    real = cohort.generate_cohort

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(cohort, "generate_cohort", counting)
    cfg = DataConfig(synth_subjects=3, synth_avm=1, synth_seed=3, synth_small=True)
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
    assert len(read_manifest(results[0])) == 3
    shifted = DataConfig(synth_subjects=3, synth_avm=1, synth_seed=3, synth_small=True,
                         synth_preset="shifted")
    assert synth.default_manifest(shifted) != results[0] and len(calls) == 2
    other = DataConfig(synth_subjects=3, synth_avm=1, synth_small=True,
                       cache_dir=str(tmp_path / "elsewhere"))
    assert synth.default_manifest(other).is_relative_to(tmp_path / "elsewhere")
