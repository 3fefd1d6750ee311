"""Lesion descriptors on analytic shapes: ball volume, depth of a ball at a known position,
solidity of boxes, a rim and a vessel shell of known density."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlssp_jax.config import DescriptorConfig
from mlssp_jax.descriptors import (
    DESCRIPTOR_NAMES,
    depth_below_surface_mm,
    hu_from_window,
    lesion_descriptors,
    solidity,
)
from mlssp_jax.preprocess import window

SIZE = 64
CENTRE = np.array([32, 32, 32])


def _ball(radius_vox: float, centre=CENTRE, size: int = SIZE) -> np.ndarray:
    grid = np.indices((size,) * 3).transpose(1, 2, 3, 0)
    return np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius_vox


def _distance_vox(centre=CENTRE, size: int = SIZE) -> np.ndarray:
    grid = np.indices((size,) * 3).transpose(1, 2, 3, 0)
    return np.linalg.norm(grid - np.asarray(centre), axis=-1)


@pytest.mark.parametrize("spacing", [1.0, 0.5])
def test_ball_volume_ml(spacing):
    radius_mm = 8.0
    lesion = _ball(radius_mm / spacing)
    brain = np.ones_like(lesion)
    d = lesion_descriptors(lesion, brain, hu=np.full(lesion.shape, 40.0), spacing_mm=spacing)
    expected_ml = 4 / 3 * math.pi * radius_mm**3 / 1000
    assert d["volume_ml"] == pytest.approx(expected_ml, rel=0.03)
    assert d["log_volume_ml"] == pytest.approx(math.log(d["volume_ml"]))


def test_anisotropic_volume_counts_voxel_size():
    lesion = np.zeros((8, 8, 8), bool)
    lesion[2:5, 2:5, 2:5] = True
    d = lesion_descriptors(lesion, np.ones_like(lesion), hu=np.zeros(lesion.shape),
                           spacing_mm=(2.0, 1.0, 0.5))
    assert d["volume_ml"] == pytest.approx(27 * 1.0 / 1000)


def test_depth_of_a_ball_at_known_position():
    brain = _ball(28)  # brain surface 28 mm from the centre
    lesion = _ball(4, centre=CENTRE + [10, 0, 0])  # centroid 10 mm off centre
    d = lesion_descriptors(lesion, brain, hu=np.full(brain.shape, 40.0))
    assert d["centroid_depth_mm"] == pytest.approx(28 - 10, abs=1.0)
    assert d["min_depth_mm"] == pytest.approx(28 - 14, abs=1.0)


def test_depth_counts_array_border_as_outside():
    depth = depth_below_surface_mm(np.ones((9, 9, 9)), spacing_mm=2.0)
    assert depth[4, 4, 4] == pytest.approx(5 * 2.0)  # 5 voxels to the padding, 2 mm each
    assert depth[0, 4, 4] == pytest.approx(2.0)


def test_solidity_of_boxes():
    mask = np.zeros((20, 8, 8), bool)
    mask[0:4, 2:6, 2:6] = True
    assert solidity(mask) == pytest.approx(1.0)
    mask[10:14, 2:6, 2:6] = True  # two 4^3 cubes 6 voxels apart: hull is a 14 x 4 x 4 box
    assert solidity(mask) == pytest.approx(128 / 224)
    assert solidity(mask, spacing_mm=(1.0, 2.0, 3.0)) == pytest.approx(128 / 224)
    assert 0.75 < solidity(_ball(6)) < 0.95  # staircase corners stick out of the sphere


def test_density_rim_and_vessels_of_known_values():
    distance = _distance_vox()
    lesion = distance <= 5
    rim = (distance > 5) & (distance <= 5 + 4)  # the 0-4 mm rim at 1 mm spacing
    hu = np.where(lesion, 60.0, np.where(rim, 30.0, 45.0))
    brain = distance <= 30
    d = lesion_descriptors(lesion, brain, hu=hu)
    assert d["hu_mean"] == pytest.approx(60.0)
    assert d["hu_std"] == pytest.approx(0.0, abs=1e-5)
    # the EDT to the voxelised lesion differs from the distance to its centre by < 1 voxel
    assert d["rim_hu_mean"] == pytest.approx(30.0, abs=1.5)
    assert d["vessel_fraction"] == 0.0  # nothing in 55-90 HU around the lesion
    bright = np.where(lesion, 60.0, 70.0)
    assert lesion_descriptors(lesion, brain, hu=bright)["vessel_fraction"] == pytest.approx(1.0)
    half = np.where(~lesion & (np.indices(hu.shape)[0] < CENTRE[0]), 70.0, 40.0)
    assert lesion_descriptors(lesion, brain, hu=half)["vessel_fraction"] == pytest.approx(
        0.5, abs=0.05)


def test_shell_parameters_come_from_config():
    distance = _distance_vox()
    lesion = distance <= 5
    hu = np.where(distance <= 5 + 2, 60.0, 20.0)  # 60 HU out to 2 mm, 20 HU beyond
    brain = distance <= 30
    narrow = lesion_descriptors(lesion, brain, hu=hu, cfg=DescriptorConfig(rim_mm=1.0))
    assert narrow["rim_hu_mean"] == pytest.approx(60.0)
    wide = lesion_descriptors(lesion, brain, hu=hu, cfg=DescriptorConfig(rim_mm=10.0))
    assert wide["rim_hu_mean"] < 45.0


def test_windowed_image_is_inverted_and_clipped():
    hu = np.array([-20.0, 0.0, 37.5, 100.0, 150.0])
    np.testing.assert_allclose(hu_from_window(window(hu, 50.0, 100.0), 50.0, 100.0),
                               [0.0, 0.0, 37.5, 100.0, 100.0], atol=1e-4)
    lesion = _ball(3)
    image = window(np.full(lesion.shape, 65.0), 50.0, 100.0)
    d = lesion_descriptors(lesion, np.ones_like(lesion), image=image)
    assert d["hu_mean"] == pytest.approx(65.0, abs=1e-3)


def test_empty_mask_gives_zero_volume_and_none():
    d = lesion_descriptors(np.zeros((8, 8, 8)), np.ones((8, 8, 8)), hu=np.zeros((8, 8, 8)))
    assert set(d) == set(DESCRIPTOR_NAMES)
    assert d["volume_ml"] == 0.0
    assert all(d[k] is None for k in DESCRIPTOR_NAMES if k != "volume_ml")


def test_needs_a_density():
    with pytest.raises(ValueError, match="hu or image"):
        lesion_descriptors(np.ones((4, 4, 4)), np.ones((4, 4, 4)))


@pytest.mark.parametrize("spacing", [2.0, (1.0, 0.7, 2.5)])
@pytest.mark.parametrize("where", ["deep", "superficial", "on the border", "lobulated"])
def test_the_crop_gives_the_same_floats_as_the_whole_array(spacing, where):
    """The cropped computation (the default) equals the whole array's, float for float: deep
    lesions make the depth's crop grow, one at the array's edge has a real border there."""
    rng = np.random.default_rng(0)
    size = 48
    brain = _ball(21, centre=(24, 24, 24), size=size) | (_distance_vox((24, 24, 40), size) < 9)
    centre = {"deep": (24, 26, 23), "superficial": (24, 24, 42), "on the border": (24, 24, 47),
              "lobulated": (30, 20, 25)}[where]
    lesion = _ball(3, centre=centre, size=size)
    if where == "lobulated":
        lesion |= _ball(2, centre=(33, 24, 25), size=size) | _ball(2, centre=(27, 17, 27),
                                                                  size=size)
    hu = np.where(lesion, 65.0, 35.0) + rng.normal(0, 8, lesion.shape)
    hu[rng.random(hu.shape) < 0.05] = 70.0  # some vessel-density voxels
    image = window(hu, 50.0, 100.0)
    # core_mm 1: a 3-voxel ball at 2.5 mm slices has no voxel 2 mm below its boundary
    kwargs = {"spacing_mm": spacing, "cfg": DescriptorConfig(vessel_max_mm=9.0, core_mm=1.0)}
    for density in ({"hu": hu}, {"image": image}):
        cropped = lesion_descriptors(lesion, brain, **density, **kwargs)
        whole = lesion_descriptors(lesion, brain, **density, **kwargs, crop=False)
        assert cropped == whole
        assert None not in cropped.values()
    depth = depth_below_surface_mm(brain, spacing)
    assert whole["min_depth_mm"] == depth[lesion].min()


def _relative_scene(rng):
    """A 5-voxel ball (60 HU, +-8 HU texture), a 0-4 mm rim of 22 HU with a patch of bone
    in it, parenchyma 30 HU with 2 HU noise; the whole 30-voxel ball is brain."""
    distance = _distance_vox()
    lesion = distance <= 5
    hu = 30.0 + rng.normal(0, 2, lesion.shape)
    hu[(distance > 5) & (distance <= 9)] = 22.0
    hu[lesion] = 60.0 + rng.normal(0, 8, lesion.shape)[lesion]
    hu[30:35, 30:35, 39] = 900.0  # the inner table, 7 voxels from the centre: in the rim
    return lesion, distance <= 30, hu


def test_relative_densities_against_the_scans_parenchyma():
    lesion, brain, hu = _relative_scene(np.random.default_rng(0))
    d = lesion_descriptors(lesion, brain, hu=hu)
    assert d["brain_hu_median"] == pytest.approx(30.0, abs=0.2)
    assert d["hu_contrast"] == pytest.approx(30.0, abs=2.0)
    assert d["rim_contrast"] == pytest.approx(-8.0, abs=0.5)  # the bone voxel left out
    assert d["rim_hu_mean"] > 24.0  # the absolute mean takes the bone in
    assert d["core_hu_mad"] == pytest.approx(8.0, rel=0.25)  # the core's own texture
    assert d["vessel_contrast_fraction"] == 0.0  # nothing 15 HU above 30 HU around it


def test_relative_descriptors_ignore_a_calibration_offset():
    """A scanner reading every soft voxel 12 HU high moves the absolute descriptors, not the
    relative ones."""
    lesion, brain, hu = _relative_scene(np.random.default_rng(1))
    shifted = np.where(hu < 100, hu + 12.0, hu)
    a, b = lesion_descriptors(lesion, brain, hu=hu), lesion_descriptors(lesion, brain, hu=shifted)
    assert b["hu_mean"] == pytest.approx(a["hu_mean"] + 12.0, abs=0.5)
    for name in ("hu_contrast", "core_hu_mad", "rim_contrast", "vessel_contrast_fraction"):
        assert b[name] == pytest.approx(a[name], abs=1e-3), name


def test_core_spread_leaves_out_the_partial_volume_edge():
    """A homogeneous clot (60 HU) whose boundary voxels alternate 35 / 85 HU: the edge
    spreads hu_std, not the core's spread; a lesion too thin for a core has none."""
    distance = _distance_vox()
    lesion = distance <= 6
    edge = lesion & (distance > 5)
    hu = np.where(lesion, 60.0, 30.0)
    hu[edge] = np.where(np.indices(hu.shape).sum(axis=0)[edge] % 2 == 0, 35.0, 85.0)
    d = lesion_descriptors(lesion, distance <= 30, hu=hu)
    assert d["hu_std"] > 10.0
    assert d["core_hu_mad"] == pytest.approx(0.0, abs=1e-6)
    thin = np.zeros_like(lesion)
    thin[30:34, 20:44, 32] = True  # one voxel thick: no voxel 2 mm below its boundary
    assert lesion_descriptors(thin, distance <= 30, hu=hu)["core_hu_mad"] is None


def test_vessel_contrast_is_relative_to_the_parenchyma():
    distance = _distance_vox()
    lesion = distance <= 5
    shell = (distance > 8) & (distance <= 12)
    hu = np.where(lesion, 70.0, 30.0)
    hu[shell & (np.indices(hu.shape)[0] < CENTRE[0])] = 50.0  # half the shell 20 HU brighter
    d = lesion_descriptors(lesion, distance <= 30, hu=hu, cfg=DescriptorConfig(vessel_max_mm=15.0))
    in_shell = (distance > 5 + 2) & (distance <= 5 + 15)  # approximately the 2-15 mm shell
    expected = np.count_nonzero(shell & (np.indices(hu.shape)[0] < CENTRE[0])) / np.count_nonzero(
        in_shell)
    assert d["vessel_contrast_fraction"] == pytest.approx(expected, rel=0.1)
    assert d["vessel_fraction"] == 0.0  # 50 HU is below the absolute 55-90 HU band


@pytest.mark.parametrize("texture_hu", [0.0, 10.0])
def test_core_texture_takes_the_scanners_noise_out(texture_hu):
    """Noise of 6 HU everywhere; the clot has its own texture (smooth over 4+ voxels) or none:
    ``noise_hu`` reads the noise, ``core_texture_hu`` the clot's texture, not the noise."""
    rng = np.random.default_rng(2)
    distance = _distance_vox()
    lesion = distance <= 8
    waves = np.sin(np.indices(lesion.shape)[0] * 2 * np.pi / 8.0) * math.sqrt(2)  # sd 1
    hu = np.where(lesion, 60.0 + texture_hu * waves, 30.0) + rng.normal(0, 6, lesion.shape)
    d = lesion_descriptors(lesion, distance <= 30, hu=hu)
    assert d["noise_hu"] == pytest.approx(6.0, rel=0.15)
    assert d["core_hu_mad"] > 5.0  # the noise alone reads as spread
    assert d["core_texture_hu"] == pytest.approx(texture_hu, abs=3.0)
