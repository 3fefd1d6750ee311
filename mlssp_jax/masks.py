"""Binary-mask helpers shared by preprocessing (the brain) and inference (the lesion).

Connectivity is 6 (face neighbours, scipy's default structure) everywhere: two voxels that
touch only at an edge or a corner belong to different components.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a boolean mask (D, H, W); all False if empty."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))
