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
    kwargs = {"spacing_mm": spacing, "cfg": DescriptorConfig(vessel_max_mm=9.0)}
    for density in ({"hu": hu}, {"image": image}):
        cropped = lesion_descriptors(lesion, brain, **density, **kwargs)
        whole = lesion_descriptors(lesion, brain, **density, **kwargs, crop=False)
        assert cropped == whole
        assert None not in cropped.values()
    depth = depth_below_surface_mm(brain, spacing)
    assert whole["min_depth_mm"] == depth[lesion].min()
