"""ABC/2 (Kothari 1996) against shapes whose answer is known, on anisotropic and oblique grids."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import rotation_about

from mlssp_jax import measurements


def grid(shape, spacing, rotation=None):
    """An affine centred on the world origin; world coordinates of every voxel centre."""
    affine = np.eye(4)
    affine[:3, :3] = (np.eye(3) if rotation is None else rotation) @ np.diag(spacing)
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    index = np.indices(shape).reshape(3, -1).T
    return affine, index @ affine[:3, :3].T + affine[:3, 3]


def test_a_square_box_gives_its_exact_volume_on_an_anisotropic_grid():
    """A and B are the diagonals (s * sqrt 2), so A*B*C/2 = s^2 h: the box's volume."""
    shape, spacing = (40, 60, 10), (0.5, 0.25, 2.0)
    affine, _ = grid(shape, spacing)
    mask = np.zeros(shape, np.uint8)
    mask[10:30, 10:50, 2:8] = 1  # 10 mm x 10 mm x 12 mm
    mask[0, 0, 0] = mask[39, 59, 9] = 1  # specks elsewhere are not the hematoma
    result = measurements.abc2(mask, affine)
    assert result.a_mm == pytest.approx(10 * np.sqrt(2), rel=1e-9)
    assert result.b_mm == pytest.approx(10 * np.sqrt(2), rel=1e-9)
    assert result.c_mm == pytest.approx(12.0)
    assert result.volume_ml == pytest.approx(1.2, rel=1e-9)
    assert result.lesion_ml == pytest.approx(1.2)  # the box alone, not the specks
    assert result.axis == 2 and 2 <= result.slice_index < 8


def test_an_ellipsoid_gives_three_over_pi_of_its_volume():
    """ABC/2 = (2a)(2b)(2c)/2 = 4abc, i.e. (pi/6) A B C with pi taken as 3: 3/pi of 4/3 pi abc.
    The ellipsoid is turned 30 degrees in the slice plane (A is not along a voxel axis)."""
    a, b, c = 20.0, 12.0, 15.0
    shape, spacing = (200, 140, 40), (0.25, 0.25, 1.0)
    affine, world = grid(shape, spacing)
    local = world @ rotation_about(2, 30)
    mask = ((local / [a, b, c]) ** 2).sum(axis=1).reshape(shape) <= 1
    result = measurements.abc2(mask, affine)
    true_ml = 4 / 3 * np.pi * a * b * c / 1000
    assert result.a_mm == pytest.approx(2 * a, abs=0.5)
    assert result.b_mm == pytest.approx(2 * b, abs=0.5)
    assert result.c_mm == pytest.approx(2 * c, abs=1.0)
    assert result.volume_ml == pytest.approx(3 / np.pi * true_ml, rel=0.03)
    length = np.linalg.norm((result.a_ends[1] - result.a_ends[0]) * spacing[:2])
    assert length == pytest.approx(result.a_mm)
    direction = (result.a_ends[1] - result.a_ends[0]) * spacing[:2] / length
    assert abs(direction @ [np.cos(np.deg2rad(30)), np.sin(np.deg2rad(30))]) > 0.999


def test_kothari_weighting_counts_an_ellipsoids_slices_as_1_366_c():
    """Area fraction 1 - z^2/c^2: >= 75% for |z| <= c/2 (weight 1), >= 25% up to 0.866 c
    (weight 1/2), so C = c + (0.866 - 0.5) c."""
    c = 20.0
    shape, spacing = (64, 64, 81), (1.0, 1.0, 0.5)
    affine, world = grid(shape, spacing)
    mask = ((world / [25.0, 25.0, c]) ** 2).sum(axis=1).reshape(shape) <= 1
    plain = measurements.abc2(mask, affine)
    weighted = measurements.abc2(mask, affine, weighted=True)
    assert weighted.c_mm == pytest.approx((1 + np.sqrt(0.75) - 0.5) * c, abs=1.0)
    assert weighted.volume_ml / plain.volume_ml == pytest.approx(weighted.c_mm / plain.c_mm)


def test_oblique_and_tilted_grids():
    """Axial = the voxel axis nearest world z; C uses the distance between slice planes, so a
    gantry tilt (slice step not along the normal) does not lengthen it."""
    shape, spacing = (30, 40, 12), (0.5, 0.5, 3.0)
    tilted, _ = grid(shape, spacing, rotation_about(0, 15))
    tilted[:3, 2] += tilted[:3, 1] / np.linalg.norm(tilted[:3, 1]) * 1.5  # 1.5 mm shear
    mask = np.zeros(shape, np.uint8)
    mask[5:25, 10:30, 3:9] = 1
    result = measurements.abc2(mask, tilted)
    assert result.axis == 2
    assert result.c_mm == pytest.approx(6 * 3.0)
    assert result.volume_ml == pytest.approx(10 * 10 * 18 / 1000, rel=1e-9)
    swapped = tilted[:, [2, 0, 1, 3]]  # the slice axis first
    again = measurements.abc2(np.moveaxis(mask, 2, 0), swapped)
    assert again.axis == 0 and again.volume_ml == pytest.approx(result.volume_ml)


def test_empty_mask_has_no_measurement():
    assert measurements.abc2(np.zeros((4, 4, 4)), np.eye(4)) is None


def test_measurement_is_placed_in_the_whole_mask_s_coordinates():
    """The lesion is measured in its bounding box; slice and end points refer to the mask."""
    small = np.zeros((12, 14, 6), np.uint8)
    small[2:9, 3:8, 1:4] = 1
    small[0, 0, 5] = 1  # a speck: not the largest lesion, but it widens the box
    shift = np.array([30, 17, 9])
    large = np.zeros((60, 50, 20), np.uint8)
    large[tuple(slice(s, s + n) for s, n in zip(shift, small.shape, strict=True))] = small
    affine = np.diag([0.5, 0.5, 4.0, 1.0])
    a, b = measurements.abc2(small, affine), measurements.abc2(large, affine)
    assert b.volume_ml == a.volume_ml and b.slice_index == a.slice_index + shift[2]
    np.testing.assert_allclose(b.a_ends, a.a_ends + shift[:2])
    np.testing.assert_allclose(b.b_ends, a.b_ends + shift[:2])
