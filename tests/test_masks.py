"""The largest connected component, 6-connected, shared by preprocessing and inference."""

from __future__ import annotations

import numpy as np

from mlssp_jax import masks


def test_largest_component_is_6_connected():
    mask = np.zeros((8, 8, 8), bool)
    mask[1:3, 1:3, 1:3] = True  # 8 voxels
    mask[3, 3, 3] = mask[4, 4, 4] = mask[5, 5, 5] = True  # corner contacts only: 3 components
    mask[5:7, 1:4, 1] = True  # 6 voxels
    big = masks.largest_component(mask)
    assert big.sum() == 8 and big[1:3, 1:3, 1:3].all()
    assert not masks.largest_component(np.zeros((4, 4, 4), bool)).any()
