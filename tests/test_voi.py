"""VOI crop around the lesion centroid, padding and oversized lesions."""

import numpy as np

from mlssp_jax import voi


def test_lesion_centre_is_rounded_centroid():
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[4:7, 10:12, 15:18] = 1  # centroid (5, 10.5, 16)
    np.testing.assert_array_equal(voi.lesion_centre(mask), [5, 10, 16])  # rint(10.5) = 10
    assert voi.lesion_centre(np.zeros((8, 10, 12))).tolist() == [4, 5, 6]


def test_crop_pads_with_background():
    volume = np.arange(10 * 12 * 14, dtype=np.float32).reshape(10, 12, 14) + 1
    centre = np.array([1, 6, 13])
    cube = voi.crop(volume, centre, 8, pad_value=0)
    assert cube.shape == (8, 8, 8)
    # VOI index v maps to volume index centre - 4 + v
    assert cube[0, 0, 0] == 0  # (-3, 2, 9) is outside
    assert cube[3, 0, 0] == volume[0, 2, 9]
    assert cube[7, 7, 4] == volume[4, 9, 13]
    assert (cube[:, :, 5:] == 0).all()  # beyond the last k
    assert np.count_nonzero(cube) == 5 * 8 * 5  # the part inside the volume, all of it


def test_lesion_exceeds():
    mask = np.zeros((40, 40, 40), np.uint8)
    mask[10:20, 10:20, 10:20] = 1
    assert not voi.lesion_exceeds(mask, 16)
    mask[10:30, 10:12, 10:12] = 1  # 20 voxels long
    assert voi.lesion_exceeds(mask, 16)
