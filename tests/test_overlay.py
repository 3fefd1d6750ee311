"""The overlay's axial view: radiological orientation from the affine, whatever the voxel order."""

from __future__ import annotations

import numpy as np

from mlssp_jax import overlay


def test_ras_and_lps_copies_show_the_same_picture_with_the_patients_right_on_the_left():
    shape = (6, 5, 4)
    ras = np.diag([0.5, 0.8, 3.0, 1.0])
    data = np.zeros(shape, np.float32)
    data[5, 4, 2] = 1  # the most right (+x) and anterior (+y) voxel of slice 2
    view, aspect = overlay.axial_view(data, ras, 2)
    assert view.shape == (5, 6) and aspect == 0.8 / 0.5
    assert view[0, 0] == 1  # anterior at the top, the patient's right on the left
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(shape[:2]) - 1
    lps_view, _ = overlay.axial_view(data[::-1, ::-1].copy(), ras @ flip, 2)
    np.testing.assert_array_equal(lps_view, view)
    swapped = ras[:, [1, 0, 2, 3]]  # voxel axes j, i: rows and columns exchanged
    swapped_view, _ = overlay.axial_view(np.swapaxes(data, 0, 1), swapped, 2)
    np.testing.assert_array_equal(swapped_view, view)


def test_slices_are_spread_over_the_lesion_and_include_the_abc2_slice():
    mask = np.zeros((8, 8, 30), np.uint8)
    mask[2:5, 2:5, 10:21] = 1
    picks = overlay.pick_slices(mask, 2, anchor=13)
    assert len(picks) == overlay.PANELS and 13 in picks
    assert all(10 <= p <= 20 for p in picks)
    assert len(overlay.pick_slices(np.zeros((8, 8, 30)), 2, None)) == overlay.PANELS
