"""Skull stripping on an analytic adult head: skull of two tables around diploe, a skull base
with air sinuses and a foramen magnum, the neck with a vertebra, a plastic head rest, three
hematomas (against the inner table, under the vertex, on the skull base), thick slices
averaged along z, oblique LPS and partial coverage. Criteria as issue 14 sets them: at most
15 mL of bone-like voxels (HU >= 100) more than 5 mm from the lesion, >= 99% of every
hematoma kept, the brain's volume that of the cavity."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from mlssp_jax import config, preprocess, skullstrip
from mlssp_jax.config import DataConfig
from mlssp_jax.errors import InputError

CFG = DataConfig(spacing_mm=2.0)  # a coarse output grid keeps the tests fast
INNER_MM = np.array([66.0, 82.0, 70.0])  # semi-axes of the inner table (world mm, RAS)
FLOOR_MM, BASE_MM = -30.0, -42.0  # top and bottom of the skull base
CANAL = np.array([0.0, -25.0])  # (x, y) of the foramen magnum and spinal canal
# (centre mm, radius mm, HU): against the inner table (flattened by it), under the vertex
# (dense: half its voxels >= 100 HU with the noise), on the skull base
HEMATOMAS = [((54.0, 10.0, 15.0), 12.0, 75.0), ((-20.0, 20.0, 55.0), 10.0, 94.0),
             ((25.0, 10.0, -22.0), 10.0, 70.0)]


def _inside(p, semi_axes, centre=(0.0, 0.0, 0.0)):
    """Bool: points ``p`` (3, N) inside the ellipsoid."""
    return sum(((p[i] - centre[i]) / semi_axes[i]) ** 2 for i in range(3)) <= 1.0


def _disc(p, centre, radius):
    """Bool: points ``p`` (3, N) within ``radius`` of ``centre`` (x, y) in the axial plane."""
    return (p[0] - centre[0]) ** 2 + (p[1] - centre[1]) ** 2 < radius**2


def _cavity(p):
    """Bool (N,): the intracranial cavity at world points ``p`` (3, N)."""
    return _inside(p, INNER_MM) & (p[2] > FLOOR_MM)


def _hematomas(p, cavity):
    """Int (N,): 1-based index of the hematoma at each point, 0 outside all."""
    label = np.zeros(p.shape[1], dtype=np.int8)
    for n, (centre, radius, _) in enumerate(HEMATOMAS, start=1):
        label[_inside(p, (radius,) * 3, centre) & cavity] = n
    return label


def _skull_and_below(p, hu, bone_scale):
    """Scalp, skull, skull base (with sinuses and a foramen), face, neck, vertebra, head rest;
    bone HU times ``bone_scale``."""
    above_base, below = p[2] > BASE_MM, (p[2] <= BASE_MM) & (p[2] > -110.0)
    for grow, value in ((12.0, 40.0), (7.0, 1300.0 * bone_scale), (5.0, 550.0 * bone_scale),
                        (2.0, 1200.0 * bone_scale)):
        hu[_inside(p, INNER_MM + grow) & above_base] = value  # scalp, tables, diploe
    hu[below & _inside(p, (INNER_MM + 10.0) / [1, 1, 0.6])] = 40.0  # face
    hu[below & _disc(p, (0.0, -10.0), 50.0)] = 40.0  # neck
    hu[below & _disc(p, CANAL, 20.0) & (p[2] < -48.0)] = 700.0  # a vertebra
    hu[below & _disc(p, CANAL, 8.0)] = 30.0  # spinal canal
    hu[_inside(p, (14, 12, 9), (0, 45, -44))] = -900.0  # sphenoid / nasal air
    for side in (-1, 1):
        hu[_inside(p, (8, 8, 5), (side * 52, -20, -36))] = -400.0  # mastoid cells
    hu[(np.abs(p[0]) < 70) & (p[1] > -106) & (p[1] < -100) & (p[2] < 30)] = 250.0  # head rest


def _phantom(p, bone_scale):
    """``(hu, lesion)`` of the analytic head at world points ``p`` (3, N)."""
    hu = np.full(p.shape[1], -1000.0, dtype=np.float32)
    _skull_and_below(p, hu, bone_scale)
    cavity = _cavity(p)
    hu[cavity] = 10.0  # CSF
    hu[cavity & _inside(p, INNER_MM - 2.0)] = 32.0  # brain
    hu[(p[2] <= FLOOR_MM) & (p[2] > BASE_MM) & _disc(p, CANAL, 14.0)] = 30.0  # foramen magnum
    lesion = _hematomas(p, cavity)
    for n, (_, _, value) in enumerate(HEMATOMAS, start=1):
        hu[lesion == n] = value
    hu[_inside(p, (2.5,) * 3, (48.0, 10.0, 15.0))] = 400.0  # calcification in a clot
    return hu, lesion


def _scan(rotation, spacing, z_range, bone_scale=1.0, seed=0, sub=4):
    """A scan of the head: each voxel the mean of ``sub`` samples along its slice (thick-slice
    partial volume), 4 HU noise; the lesion label at the voxel centres."""
    spacing = np.asarray(spacing, dtype=float)
    extent = np.array([170.0, 215.0, z_range[1] - z_range[0]])
    shape = tuple(int(n) for n in np.ceil(extent / spacing))
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    centre = np.array([0.0, -10.0, (z_range[0] + z_range[1]) / 2])
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    index = np.indices(shape, dtype=np.float32).reshape(3, -1)
    world = (affine[:3, :3] @ index + affine[:3, 3:]).astype(np.float32)
    hu = np.zeros(index.shape[1], dtype=np.float32)
    for offset in (np.arange(sub) + 0.5) / sub - 0.5:
        hu += _phantom(world + (affine[:3, 2:3] * offset).astype(np.float32), bone_scale)[0] / sub
    lesion = _phantom(world, bone_scale)[1]
    hu += np.random.default_rng(seed).normal(0.0, 4.0, len(hu)).astype(np.float32)
    return hu.reshape(shape), lesion.reshape(shape), affine


def _tilt(deg):
    a = np.deg2rad(deg)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


SCANS = {  # rotation, spacing mm, z range mm (world)[, bone HU scale]
    "ras_5mm_whole_head": (np.eye(3), (1.5, 1.5, 5.0), (-100.5, 89.5)),  # 0.5 mm floor in a slice
    "lps_oblique_4.5mm": (np.diag([-1.0, -1.0, 1.0]) @ _tilt(15.0), (1.6, 1.6, 4.5),
                          (-90.0, 85.0)),
    "ras_2mm_cut_below": (np.eye(3), (1.5, 1.5, 2.0), (-12.0, 80.0)),  # partial coverage
    "ras_6mm_soft_bone": (np.eye(3), (1.5, 1.5, 6.0), (-100.0, 90.0), 0.6),  # tables ~750 HU
}


@pytest.fixture(scope="module", params=sorted(SCANS))
def stripped(request):
    hu, lesion, affine = _scan(*SCANS[request.param])
    out = preprocess.preprocess_arrays(hu, affine, lesion > 0, CFG)
    each = [preprocess.resample_mask(lesion == n, affine, out["affine"], out["image"].shape)
            for n in range(1, len(HEMATOMAS) + 1)]
    return request.param, out, each, (hu, affine)


def test_no_bone_left_and_every_hematoma_kept(stripped):
    name, out, each, _ = stripped
    report = skullstrip.strip_report(out["image"] >= 1.0, out["brain"], out["mask"],
                                     CFG.spacing_mm)
    assert report["bone_ml"] <= 15.0, (name, report)
    assert report["lesion_kept"] >= 0.99, (name, report)
    present = [n for n, truth in enumerate(each) if truth.sum() > 50]
    assert len(present) == (2 if "cut" in name else 3)
    for n in present:
        inside = out["brain"][each[n]].mean()
        assert inside >= 0.99, (name, n, inside)


def test_brain_is_the_cavity(stripped):
    """The brain's volume is the cavity's inside the scanned slab (plus the foramen magnum and
    the spinal canal), within -10% .. +5%: bone, scalp, face, neck and head rest are gone."""
    name, out, _, (hu, affine) = stripped
    index = np.indices(out["image"].shape).reshape(3, -1).astype(float)
    world = out["affine"][:3, :3] @ index + out["affine"][:3, 3:]
    fov = preprocess.field_of_view(hu.shape, affine, out["affine"], out["image"].shape)
    cavity_ml = (_cavity(world) & fov.ravel()).sum() * CFG.spacing_mm**3 / 1000.0
    brain_ml = out["brain"].sum() * CFG.spacing_mm**3 / 1000.0
    assert 0.9 < brain_ml / cavity_ml < 1.05, (name, brain_ml, cavity_ml)
    if "whole" in name:
        assert 1100.0 < brain_ml < 1450.0
    canal = _disc(world, CANAL, 14.0) & (world[2] <= FLOOR_MM)  # foramen magnum, spinal canal
    allowed = (_cavity(world) | canal).reshape(out["brain"].shape)
    outside = ~ndimage.binary_dilation(allowed, iterations=2)  # 4 mm away: face, neck, rest
    assert out["brain"][outside].sum() * CFG.spacing_mm**3 / 1000.0 < 1.0, name


def test_report_counts_bone_far_from_the_lesion_only():
    brain = np.ones((20, 20, 20), dtype=bool)
    lesion = np.zeros_like(brain)
    lesion[2:4, 2:4, 2:4] = True
    bone_like = np.zeros_like(brain)
    bone_like[4, 2, 2] = True  # 1 voxel (2 mm) from the lesion: not counted
    bone_like[15:17, 15:17, 15:17] = True  # far: 8 voxels of 8 uL
    brain[3, 3, 3] = False
    report = skullstrip.strip_report(bone_like, brain, lesion, spacing_mm=2.0)
    assert report == {"bone_ml": pytest.approx(0.064), "brain_ml": pytest.approx(7999 * 0.008),
                      "lesion_kept": pytest.approx(7 / 8)}


def test_strip_parameters_are_config_fields_in_the_cache_key():
    assert set(skullstrip.STRIP_FIELDS) <= {f.name for f in dataclasses.fields(DataConfig)}
    base = preprocess.preprocessing_params(CFG)
    for name in skullstrip.STRIP_FIELDS:
        changed = dataclasses.replace(CFG, **{name: getattr(CFG, name) + 1.0})
        assert preprocess.preprocessing_params(changed) != base, name


@pytest.mark.parametrize("override", ["data.strip_rim_mm=-1", "data.strip_bone_hu=50",
                                      "data.strip_hematoma_min_hu=-30",
                                      "data.strip_rim_max_hu=200", "data.strip_core_mm=-0.5",
                                      "data.strip_hematoma_max_hu=40"])
def test_bad_strip_parameters_rejected(override):
    with pytest.raises(InputError, match=override.split("=")[0]):
        config.load(None, [override])
