"""The volume of interest (VOI): a cube of ``voi_size`` voxels (1 mm) around the lesion.

The paper crops a 64^3 VOI containing the lesion. Here the VOI is centred on the lesion's
centroid (rounded to a voxel); where it leaves the volume it is padded with the background
value (0 after windowing and skull stripping). A lesion larger than the VOI is cropped
around its centroid: :func:`lesion_exceeds` tells which ones (the loader logs the count).
"""

from __future__ import annotations

import numpy as np


def lesion_centre(mask: np.ndarray) -> np.ndarray:
    """Centroid of a 3-D ``mask`` as a (3,) int voxel index (rounded); array centre if empty."""
    points = np.argwhere(mask)
    if len(points) == 0:
        return np.asarray(mask.shape[:3], dtype=np.int64) // 2
    return np.rint(points.mean(axis=0)).astype(np.int64)


def _windows(centre: np.ndarray, size: int, shape: tuple[int, ...]) -> tuple[tuple, tuple]:
    """Matching (volume slices, VOI slices) of the overlap of the VOI with the volume."""
    start = np.asarray(centre, dtype=np.int64) - size // 2
    lo = np.maximum(start, 0)
    hi = np.minimum(start + size, np.asarray(shape[:3]))
    hi = np.maximum(hi, lo)
    volume_sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    voi_sl = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True))
    return volume_sl, voi_sl


def crop(volume: np.ndarray, centre: np.ndarray, size: int, pad_value: float = 0) -> np.ndarray:
    """The (size, size, size, ...) cube of ``volume`` starting at ``centre - size // 2``.

    Trailing axes beyond the first three are kept. Parts outside ``volume`` are ``pad_value``.
    """
    out = np.full((size, size, size) + volume.shape[3:], pad_value, dtype=volume.dtype)
    volume_sl, voi_sl = _windows(centre, size, volume.shape)
    out[voi_sl] = volume[volume_sl]
    return out


def lesion_exceeds(mask: np.ndarray, size: int) -> bool:
    """True if some lesion voxel lies outside the ``size``^3 VOI centred on the lesion."""
    total = int(np.count_nonzero(mask))
    return int(np.count_nonzero(crop(mask, lesion_centre(mask), size))) < total
