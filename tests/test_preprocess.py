"""Preprocessing in physical space: volume/centroid kept on anisotropic, oblique and LPS grids,
orientation invariance, exact windowing, skull stripping that keeps a superficial lesion."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlssp_jax import manifest, nifti, preprocess
from mlssp_jax.config import DataConfig

CFG = DataConfig()
TINY = DataConfig(spacing_mm=2.0)  # for the tiny cohort (--small scans, normal-size heads)
SCALP_MM, SKULL_OUT_MM, SKULL_IN_MM = 34.0, 31.0, 26.0  # radii of a spherical head
LESION_MM = 8.0  # radius of the lesion, touching the inner table of the skull
LESION_CENTRE = np.array([SKULL_IN_MM - LESION_MM, 3.0, -2.0])  # world mm (RAS)


def _rotation(deg_x: float, deg_z: float) -> np.ndarray:
    ax, az = np.deg2rad([deg_x, deg_z])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


def _grid_affine(rotation: np.ndarray, spacing: tuple, shape: tuple, centre=(5.0, -4.0, 12.0)):
    """Affine whose index-space centre lands on world ``centre``."""
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = np.asarray(centre) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


def _head(shape, affine, head_centre=(5.0, -4.0, 12.0), seed=0):
    """HU image and lesion mask of a spherical head sampled at the voxel centres of the grid."""
    index = np.indices(shape).reshape(3, -1).T.astype(np.float64)
    world = index @ affine[:3, :3].T + affine[:3, 3] - np.asarray(head_centre)
    r = np.linalg.norm(world, axis=1)
    hu = np.full(len(r), -1000.0)
    hu[r < SCALP_MM] = 40.0
    hu[r < SKULL_OUT_MM] = 1200.0
    hu[r < SKULL_IN_MM] = 32.0
    lesion = np.linalg.norm(world - LESION_CENTRE, axis=1) <= LESION_MM
    hu[lesion] = 70.0
    hu += np.random.default_rng(seed).normal(0.0, 4.0, len(r))
    return hu.reshape(shape).astype(np.float32), lesion.reshape(shape).astype(np.uint8)


def _world_stats(mask, affine):
    """(volume mL, world centroid mm) of a mask on a grid."""
    points = np.argwhere(mask).astype(np.float64)
    volume_ml = len(points) * abs(np.linalg.det(affine[:3, :3])) / 1000.0
    return volume_ml, points.mean(axis=0) @ affine[:3, :3].T + affine[:3, 3]


GRIDS = {
    "ras_anisotropic": (np.eye(3), (0.45, 0.45, 5.0), (160, 160, 16)),
    "lps_anisotropic": (np.diag([-1.0, -1.0, 1.0]), (0.45, 0.45, 5.0), (160, 160, 16)),
    "oblique": (_rotation(18.0, 25.0), (0.45, 0.45, 5.0), (165, 165, 17)),
    "oblique_lps": (np.diag([-1.0, -1.0, 1.0]) @ _rotation(-12.0, 40.0), (0.5, 0.5, 4.5),
                    (150, 150, 18)),
}


@pytest.fixture(scope="module", params=sorted(GRIDS))
def case(request):
    rotation, spacing, shape = GRIDS[request.param]
    affine = _grid_affine(rotation, spacing, shape)
    hu, mask = _head(shape, affine)
    return hu, mask, affine, preprocess.preprocess_arrays(hu, affine, mask, CFG)


def test_lesion_volume_and_world_centroid_kept(case):
    _, mask, affine, out = case
    volume_in, centroid_in = _world_stats(mask, affine)
    volume_out, centroid_out = _world_stats(out["mask"], out["affine"])
    assert abs(volume_out / volume_in - 1.0) < 0.05
    assert np.linalg.norm(centroid_out - centroid_in) < 1.0
    # and the truth in world space: the sphere of radius LESION_MM at LESION_CENTRE
    assert np.linalg.norm(centroid_out - (LESION_CENTRE + [5.0, -4.0, 12.0])) < 1.0
    assert abs(volume_out / (4 / 3 * np.pi * LESION_MM**3 / 1000) - 1.0) < 0.10


def test_output_format_and_superficial_lesion_kept(case):
    _, _, _, out = case
    assert out["image"].dtype == np.float32 and out["brain"].dtype == np.uint8
    assert out["mask"].dtype == np.uint8 and out["affine"].shape == (4, 4)
    np.testing.assert_allclose(out["affine"][:3, :3], np.eye(3))  # 1 mm RAS
    assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0
    assert (out["image"][out["brain"] == 0] == 0).all()
    assert out["lesion_kept_fraction"] >= 0.99
    brain_ml = out["brain"].sum() / 1000.0
    cavity_ml = 4 / 3 * np.pi * SKULL_IN_MM**3 / 1000.0
    # the skull and scalp are gone, the brain is not; the partial-volume rim (HU >= 100, over
    # ~7% bone) goes too: on this 26 mm head with 5 mm slices about a tenth of the cavity
    assert 0.85 < brain_ml / cavity_ml < 1.05


def test_tilted_slab_cutting_through_the_head_keeps_the_brain_at_its_edge():
    """A gantry-tilted scan covering part of the head; the slab ends inside the lesion."""
    shape, spacing = (150, 150, 6), (0.45, 0.45, 5.0)
    centre = np.array([5.0, -4.0, 12.0])
    affine = _grid_affine(_rotation(20.0, 0.0), spacing, shape, centre=centre + [0.0, 0.0, 3.0])
    hu, mask = _head(shape, affine)  # slab: 30 mm thick, tilted 20 degrees about x
    out = preprocess.preprocess_arrays(hu, affine, mask, CFG)
    assert out["lesion_kept_fraction"] >= 0.99
    brain_ml = out["brain"].sum() / 1000.0
    # the cavity (radius SKULL_IN_MM) between the slab's outer voxel faces, h = -15 .. 15 mm
    # from the slab's mid-plane, which is 3 mm above the head centre along the slab normal
    h = np.linspace(-15.0, 15.0, 2000) + 3.0
    section_mm2 = np.pi * np.clip(SKULL_IN_MM**2 - h**2, 0, None)
    assert 0.9 < brain_ml / (np.trapezoid(section_mm2, h) / 1000.0) < 1.05


def test_same_scan_in_two_orientations_gives_same_output():
    shape, spacing = (90, 90, 16), (0.8, 0.8, 5.0)
    ras = _grid_affine(np.eye(3), spacing, shape)
    hu, mask = _head(shape, ras)
    # the same voxels stored LPS-like: i and j reversed, affine adjusted to the same world points
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.asarray(shape[:2]) - 1
    lps = ras @ flip
    out_ras = preprocess.preprocess_arrays(hu, ras, mask, CFG)
    out_lps = preprocess.preprocess_arrays(hu[::-1, ::-1].copy(), lps, mask[::-1, ::-1].copy(), CFG)
    np.testing.assert_allclose(out_lps["affine"], out_ras["affine"], atol=1e-9)
    np.testing.assert_allclose(out_lps["image"], out_ras["image"], atol=1e-4)
    assert (out_lps["brain"] != out_ras["brain"]).mean() < 1e-4
    assert (out_lps["mask"] != out_ras["mask"]).sum() <= 2


def test_window_exact():
    got = preprocess.window(np.array([-1000.0, 0.0, 25.0, 50.0, 100.0, 2000.0]), 50.0, 100.0)
    np.testing.assert_array_equal(got, np.array([0.0, 0.0, 0.25, 0.5, 1.0, 1.0], np.float32))
    assert got.dtype == np.float32


def test_no_mask_gives_zero_mask():
    shape = (80, 80, 14)
    affine = _grid_affine(np.eye(3), (0.9, 0.9, 6.0), shape)
    hu, _ = _head(shape, affine)
    out = preprocess.preprocess_arrays(hu, affine, None, CFG)
    assert out["mask"].shape == out["image"].shape and not out["mask"].any()
    assert out["lesion_kept_fraction"] == 1.0


REPO = Path(__file__).resolve().parents[1]


def _run_command(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "mlssp_jax.preprocess", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_command_end_to_end_on_tiny_cohort(tiny_cohort, tmp_path):
    out = tmp_path / "pre"
    result = _run_command("--data", str(tiny_cohort), "--out", str(out), "--workers", "2",
                          "--set", "data.spacing_mm=2.0")
    assert result.returncode == 0, result.stderr
    subjects = manifest.read_manifest(tiny_cohort)
    expected = sorted(f"{s.subject_id}.npz" for s in subjects)
    assert sorted(p.name for p in out.glob("*.npz")) == expected
    summary = json.loads((out / "preprocess.json").read_text())
    assert min(summary["lesion_kept_fraction"].values()) >= 0.99
    assert "kept" in result.stderr  # logged per subject
    for subject in subjects[:2]:
        with np.load(out / f"{subject.subject_id}.npz") as npz:
            assert npz["image"].dtype == np.float32 and npz["mask"].dtype == np.uint8
            assert npz["brain"].dtype == np.uint8 and npz["affine"].shape == (4, 4)
            assert npz["image"].max() <= 1.0 and (npz["image"][npz["brain"] == 0] == 0).all()
            # the lesion keeps its volume (mL) through resampling to the 2 mm grid; --small
            # volumes are coarse (2-3 mm in-plane, 5 mm slices): linear interpolation rounds
            # the corners of small lesions (the 0.45 x 0.45 x 5 mm spheres above: within 3%)
            source = nifti.load_mask(subject.mask, like=nifti.load_image(subject.image))
            volume_in = source.data.sum() * source.voxel_volume_ml
            volume_out = npz["mask"].sum() * TINY.spacing_mm**3 / 1000.0
            assert abs(volume_out / volume_in - 1.0) < 0.08


def test_command_bad_manifest_exit_2(tmp_path):
    bad = tmp_path / "manifest.csv"
    bad.write_text("subject_id,image,mask,label\na,missing.nii.gz,missing_mask.nii.gz,1\n")
    result = _run_command("--data", str(bad), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "manifest.csv" in lines[0]
    assert not (tmp_path / "out").exists()


def test_cache_reused_unless_params_or_inputs_change(tiny_cohort, tmp_path):
    subjects = manifest.read_manifest(tiny_cohort)[:2]
    out = tmp_path / "cache"
    paths = preprocess.preprocess_cohort(subjects, out, TINY, workers=1)
    first = {sid: p.stat().st_mtime_ns for sid, p in paths.items()}
    preprocess.preprocess_cohort(subjects, out, TINY, workers=1)
    assert {sid: p.stat().st_mtime_ns for sid, p in paths.items()} == first  # reused
    image = subjects[0].image
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    preprocess.preprocess_cohort(subjects, out, TINY, workers=1)
    second = {sid: p.stat().st_mtime_ns for sid, p in paths.items()}
    assert second[subjects[0].subject_id] != first[subjects[0].subject_id]  # input changed
    assert second[subjects[1].subject_id] == first[subjects[1].subject_id]
    wider = dataclasses.replace(TINY, window_width_hu=80.0)
    preprocess.preprocess_cohort(subjects, out, wider, workers=1)
    third = {sid: p.stat().st_mtime_ns for sid, p in paths.items()}
    assert all(third[sid] != second[sid] for sid in third)  # parameter changed


def test_cached_cohort_under_cache_dir(tiny_cohort, tmp_path):
    subjects = manifest.read_manifest(tiny_cohort)[:3]
    subset = tmp_path / "manifest.csv"
    subset.write_text("subject_id,image,mask,label\n" + "".join(
        f"{s.subject_id},{s.image},{s.mask},{s.label}\n" for s in subjects))
    cfg = dataclasses.replace(TINY, cache_dir=str(tmp_path / "cache"))
    paths = preprocess.cached_cohort(subset, cfg, workers=1)
    assert list(paths) == [s.subject_id for s in subjects]
    assert all(p.is_file() and (tmp_path / "cache" / "preprocessed") in p.parents
               for p in paths.values())
    stamps = [p.stat().st_mtime_ns for p in paths.values()]
    assert preprocess.cached_cohort(subset, cfg, workers=1) == paths
    assert [p.stat().st_mtime_ns for p in paths.values()] == stamps
    other = preprocess.cached_cohort(subset, dataclasses.replace(cfg, window_level_hu=40.0), 1)
    assert set(other.values()).isdisjoint(paths.values())  # other parameters, other folder
