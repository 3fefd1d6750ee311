"""Training patches drawn from whole preprocessed volumes (nnU-Net's foreground oversampling).

``data.sampling = "whole_volume"``: each training sample is a ``voi_size``^3 patch of the
whole skull-stripped volume. With probability ``data.lesion_patch_fraction`` (nnU-Net: 1/3)
it is centred on a uniformly drawn lesion voxel, otherwise on a uniformly drawn brain voxel.
The patch's start is then clamped so it never leaves the volume; along an axis shorter than
the patch, the volume sits in the patch's middle, padded with background (``AIR_HU``, brain
0, lesion 0). The patch counts in the classification loss (``cls_weight`` 1) only if it
holds at least ``data.cls_min_lesion_fraction`` of the lesion's voxels: its label describes
a lesion it shows. All randomness comes from the generator given, so a sample is a pure
function of (seed, epoch, index) in the loader.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlssp_jax import voi
from mlssp_jax.preprocess import AIR_HU

log = logging.getLogger(__name__)


def _flat(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask).astype(np.int32)


def load_volumes(paths: Mapping[str, Path], ids: Sequence[str], labels: Mapping[str, int],
                 native_masks: Mapping[str, Path] | None = None) -> list[dict[str, Any]]:
    """Whole preprocessed volumes of ``ids`` for patch sampling and whole-scan evaluation.

    Each: ``subject_id``, ``label`` float32, ``hu`` float16 (I, J, K) skull-stripped HU,
    ``image`` float32 (I, J, K) windowed, ``brain`` and ``mask`` uint8 (I, J, K), ``affine``
    (4, 4), ``lesion_voxels`` and ``brain_voxels`` (flat int32 indices; every voxel if the
    brain mask is empty), ``spacing_mm`` (the grid's voxel size) and ``native_mask_path``
    (the subject's mask on its scan's own grid, from ``native_masks``; None if not given).
    """
    out = []
    for subject_id in ids:
        with np.load(paths[subject_id]) as npz:
            arrays = {key: npz[key] for key in ("hu", "image", "brain", "mask", "affine")}
        brain = arrays["brain"]
        out.append({"subject_id": subject_id, "label": np.float32(labels[subject_id]),
                    **arrays, "lesion_voxels": _flat(arrays["mask"]),
                    "brain_voxels": _flat(brain if brain.any() else np.ones_like(brain)),
                    "spacing_mm": float(np.linalg.norm(arrays["affine"][:3, 0])),
                    "native_mask_path": (native_masks or {}).get(subject_id)})
    log.info("loaded %d whole volumes", len(out))
    return out


def patch_start(centre: np.ndarray, size: int, shape: Sequence[int]) -> np.ndarray:
    """(3,) int start of the ``size``^3 patch around ``centre``, clamped inside ``shape``.

    Where the volume is at least ``size`` long the patch lies inside it; where it is
    shorter the start is negative, centring the volume in the patch (padding both sides).
    """
    shape = np.asarray(shape[:3], dtype=np.int64)
    start = np.asarray(centre, dtype=np.int64) - size // 2
    inside = np.clip(start, 0, np.maximum(shape - size, 0))
    return np.where(shape >= size, inside, -((size - shape) // 2))


def draw_centre(example: Mapping[str, Any], rng: np.random.Generator,
                lesion_fraction: float) -> tuple[np.ndarray, bool]:
    """A (3,) voxel: a random lesion voxel with probability ``lesion_fraction`` (if the
    volume has a lesion), else a random brain voxel; and whether it was the lesion's."""
    lesion = example["lesion_voxels"]
    on_lesion = len(lesion) > 0 and rng.random() < lesion_fraction
    pool = lesion if on_lesion else example["brain_voxels"]
    flat = pool[rng.integers(len(pool))]
    return np.array(np.unravel_index(flat, example["mask"].shape)), bool(on_lesion)


def crop_at(volume: np.ndarray, start: np.ndarray, size: int, pad_value: float) -> np.ndarray:
    """The ``size``^3 cube of ``volume`` starting at ``start`` (parts outside: ``pad_value``)."""
    return voi.crop(volume, np.asarray(start) + size // 2, size, pad_value)


def sample_patch(example: Mapping[str, Any], rng: np.random.Generator, size: int,
                 lesion_fraction: float, cls_min_lesion_fraction: float) -> dict[str, Any]:
    """One training patch of a whole volume (see the module docstring).

    Returns ``hu`` float32, ``brain`` bool, ``mask`` uint8 (size, size, size), ``label``,
    ``spacing_mm``, ``start`` (3,) int, ``lesion_centred`` bool and ``cls_weight`` float32.
    """
    centre, lesion_centred = draw_centre(example, rng, lesion_fraction)
    start = patch_start(centre, size, example["mask"].shape)
    mask = crop_at(example["mask"], start, size, 0)
    total = len(example["lesion_voxels"])
    held = int(np.count_nonzero(mask)) / total if total else 0.0
    return {"hu": crop_at(example["hu"], start, size, AIR_HU).astype(np.float32),
            "brain": crop_at(example["brain"], start, size, 0).astype(bool), "mask": mask,
            "label": example["label"], "spacing_mm": example["spacing_mm"], "start": start,
            "lesion_centred": lesion_centred,
            "cls_weight": np.float32(total > 0 and held >= cls_min_lesion_fraction)}
