"""Whole-volume inference as a few pure functions (nnU-Net's sliding-window scheme).

Volumes are 3-D arrays ``(D, H, W)`` on the preprocessed 1 mm grid; a ``predict_fn`` takes a
batch of windows ``(B, S, S, S, 1)`` float32 and returns ``{"seg_prob": (B, S, S, S[, 1]) | None,
"cls_prob": (B,) | None}`` (probabilities in [0, 1]), as ``train_step.make_predict_fn`` does once
its parameters are bound, or :class:`mlssp_jax.ensemble.Ensemble`'s ``windows`` / ``voi``
(every fold dispatched in turn, TTA views inside the call, the mean on the device).

Whole scan, from a preprocessed volume and its brain mask to a probability:
``predict_volume(volume, brain, make_ensemble(cfg.model, [params, ...], tta), window)``.
The probability goes back to the scan's own grid with :func:`resample_mask`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from mlssp_jax import augment, ensemble, masks, metrics, voi

PredictFn = Callable[[np.ndarray], dict]
BATCH_VOXELS = 4 * 32**3  # voxels per batch of windows: 4 windows of 32^3


def auto_batch(window: int, voxels: int = BATCH_VOXELS) -> int:
    """Windows per batch: about ``voxels`` voxels of ``window``^3 windows, at least 1."""
    return max(1, voxels // window**3)


def sliding_window_steps(shape: Sequence[int], window: int, overlap: float) -> list[list[int]]:
    """Start indices of the windows along each axis, evenly spaced, covering the whole volume.

    As nnU-Net's ``compute_steps_for_sliding_window``: the target stride is
    ``window * (1 - overlap)``; the first window starts at 0 and the last ends at the border.
    Every axis must be at least ``window`` long.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    steps = []
    for size in shape:
        if size < window:
            raise ValueError(f"axis of size {size} is smaller than the window {window}")
        target = window * (1.0 - overlap)
        count = math.ceil((size - window) / target) + 1
        stride = (size - window) / (count - 1) if count > 1 else 0.0
        steps.append([int(round(stride * n)) for n in range(count)])
    return steps


def gaussian_importance(window: int, sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """(S, S, S) float32 weights: a Gaussian centred on the window, sigma = S * sigma_scale, max 1.

    Voxels near a window's border count less when overlapping windows are averaged, as in
    nnU-Net's ``compute_gaussian``. The smallest weight is kept above zero.
    """
    coords = np.arange(window, dtype=np.float64) - (window - 1) / 2.0
    profile = np.exp(-0.5 * (coords / (window * sigma_scale)) ** 2)
    weights = profile[:, None, None] * profile[None, :, None] * profile[None, None, :]
    weights /= weights.max()
    return np.maximum(weights, 1e-6).astype(np.float32)


def window_weights(window: int, gaussian: bool = True) -> np.ndarray:
    """(S, S, S) float32 weights of one window's voxels: :func:`gaussian_importance`, or 1."""
    return gaussian_importance(window) if gaussian else np.ones((window,) * 3, np.float32)


def with_tta(predict_fn: PredictFn, tta: str) -> PredictFn:
    """``predict_fn`` whose ``seg_prob`` is the mean over the TTA views, on the host (NumPy).

    For any predict_fn; :class:`mlssp_jax.ensemble.Ensemble` does the same inside its
    compiled call. ``tta``: a key of :data:`mlssp_jax.ensemble.TTA_MODES`.
    """
    count = ensemble.TTA_MODES[tta]
    if count == 1:
        return predict_fn

    def predict(images: np.ndarray) -> dict:
        total = np.zeros(images.shape, np.float32)
        for index in range(count):
            moved = np.stack([augment.symmetry(index, x) for x in images])
            prob = np.asarray(predict_fn(moved)["seg_prob"], np.float32).reshape(images.shape)
            back = augment.inverse(index)
            total += np.stack([augment.symmetry(back, x) for x in prob])
        return {"seg_prob": total / count, "cls_prob": None}

    return predict


def window_starts(shape: Sequence[int], window: int, overlap: float,
                  brain: np.ndarray | None = None) -> list[tuple[int, int, int]]:
    """Corners of the windows over a volume of ``shape`` (each axis >= window).

    With a ``brain`` mask (same shape), only the windows holding at least one brain voxel.
    """
    starts = list(itertools.product(*sliding_window_steps(shape, window, overlap)))
    if brain is None:
        return starts
    return [s for s in starts if brain[tuple(slice(a, a + window) for a in s)].any()]


def sliding_window_predict(volume: np.ndarray, predict_fn: PredictFn, window: int,
                           overlap: float = 0.5, batch_size: int = 2, tta: str | bool = "none",
                           progress: bool = False, *, brain: np.ndarray | None = None,
                           gaussian: bool = True) -> np.ndarray:
    """Segmentation probability (D, H, W) float32 of a whole volume (D, H, W).

    Windows of ``window``^3 voxels (a multiple of 16 for the network; any size for a toy
    predict_fn) slide with the given overlap; their predictions are averaged with Gaussian
    weights (``gaussian=False``: plain mean). An axis shorter than the window is
    zero-padded (then cropped back). With a ``brain`` mask (D, H, W) only windows holding a
    brain voxel are evaluated: inside the brain the result is the same as with every window,
    voxels no window covers are 0. ``tta`` ("none", "flips", "all"; True = "all") averages
    each window over cube symmetries on the host (an :class:`~mlssp_jax.ensemble.Ensemble`
    does it on the device instead). Batches are always ``batch_size`` windows (the last one
    zero-filled) so a jitted model compiles once; the next batch is dispatched before the
    previous one is accumulated, so host and device work overlap. ``progress``: a bar.
    """
    tta = {True: "all", False: "none"}.get(tta, tta)
    predict_fn = with_tta(predict_fn, tta)
    pad = [(0, max(0, window - s)) for s in volume.shape]
    padded = np.pad(volume.astype(np.float32), pad)
    inside = None if brain is None else np.pad(np.asarray(brain, bool), pad)
    weights = window_weights(window, gaussian)
    total = np.zeros(padded.shape, np.float32)
    norm = np.zeros(padded.shape, np.float32)
    starts = window_starts(padded.shape, window, overlap, inside)
    boxes = [tuple(slice(s, s + window) for s in start) for start in starts]

    def accumulate(chunk: list[tuple[slice, ...]], out: dict) -> None:
        prob = _seg_prob(out, batch_size, window)
        for box, p in zip(chunk, prob, strict=False):
            total[box] += p * weights
            norm[box] += weights

    pending = None
    batches = range(0, len(boxes), batch_size)
    for first in tqdm(batches, desc="windows", unit="batch", leave=False, disable=not progress):
        chunk = boxes[first:first + batch_size]
        batch = np.zeros((batch_size,) + (window,) * 3 + (1,), np.float32)  # one compile
        for i, box in enumerate(chunk):
            batch[i, ..., 0] = padded[box]
        out = predict_fn(batch)  # a jitted call returns before the device is done
        if pending is not None:
            accumulate(*pending)
        pending = (chunk, out)
    if pending is not None:
        accumulate(*pending)
    out = np.divide(total, norm, out=np.zeros_like(total), where=norm > 0)
    return out[tuple(slice(0, s) for s in volume.shape)]


def _seg_prob(out: dict, batch_size: int, window: int) -> np.ndarray:
    """(B, S, S, S) float32 segmentation probabilities from a predict_fn's output."""
    if out["seg_prob"] is None:
        raise ValueError("the model has no segmentation output")
    return np.asarray(out["seg_prob"], np.float32).reshape((batch_size,) + (window,) * 3)


def brain_box(brain: np.ndarray, window: int) -> tuple[slice, ...]:
    """Slices of the brain's bounding box, grown to at least ``window`` voxels per axis."""
    if not brain.any():
        return tuple(slice(0, s) for s in brain.shape)
    box = []
    for axis, size in enumerate(brain.shape):
        hits = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
        lo, hi = int(hits[0]), int(hits[-1]) + 1
        grow = max(0, window - (hi - lo))
        lo = max(0, lo - grow // 2)
        box.append(slice(lo, min(size, max(hi, lo + window))))
    return tuple(box)


def window_count(brain: np.ndarray, window: int, overlap: float) -> int:
    """How many windows :func:`predict_volume` evaluates for ``brain`` (D, H, W) 0/1."""
    inside = np.asarray(brain[brain_box(brain, window)], bool)
    inside = np.pad(inside, [(0, max(0, window - s)) for s in inside.shape])
    return len(window_starts(inside.shape, window, overlap, inside))


def predict_volume(volume: np.ndarray, brain: np.ndarray, model: ensemble.Ensemble,
                   window: int, overlap: float = 0.5, batch_size: int = 2,
                   gaussian: bool = True, progress: bool = False) -> np.ndarray:
    """Segmentation probability (D, H, W) float32 of a preprocessed volume (D, H, W).

    Sliding windows over the brain's bounding box only, and only windows holding a brain
    voxel (``brain`` (D, H, W) 0/1); 0 elsewhere. ``model`` averages its folds and TTA
    views on the device (:func:`mlssp_jax.ensemble.make_ensemble`).
    """
    box = brain_box(brain, window)
    prob = np.zeros(volume.shape, np.float32)
    prob[box] = sliding_window_predict(volume[box], model.windows, window, overlap, batch_size,
                                       progress=progress, brain=brain[box], gaussian=gaussian)
    return prob


def classification_centre(prob: np.ndarray, threshold: float) -> np.ndarray:
    """(3,) int voxel index: the centre of mass of the largest predicted lesion.

    With no voxel above ``threshold``, the voxel of highest probability (the likeliest lesion).
    """
    component = masks.largest_component(metrics.binarize(prob, threshold))
    if not component.any():
        return np.array(np.unravel_index(int(np.argmax(prob)), prob.shape))
    return np.round(ndimage.center_of_mass(component)).astype(int)


def classify(volume: np.ndarray, prob: np.ndarray, predict_fn: PredictFn, voi_size: int,
             threshold: float, batch_size: int = 1) -> tuple[float | None, np.ndarray]:
    """AVM probability from the VOI (``voi_size``^3) centred on the largest predicted lesion.

    The VOI is sent as the first of a zero-filled batch of ``batch_size`` (the sliding
    window's, so a jitted model is not compiled again). Returns ``(probability or None if
    the model has no classifier, centre (3,) int)``.
    """
    centre = classification_centre(prob, threshold)
    batch = np.zeros((batch_size,) + (voi_size,) * 3 + (1,), np.float32)
    batch[0, ..., 0] = voi.crop(volume, centre, voi_size)
    cls_prob = predict_fn(batch)["cls_prob"]
    return (None if cls_prob is None else float(np.asarray(cls_prob).reshape(-1)[0])), centre


def resample_mask(prob: np.ndarray, prob_affine: np.ndarray, input_affine: np.ndarray,
                  input_shape: Sequence[int], threshold: float) -> np.ndarray:
    """Binary mask (uint8, ``input_shape``) on the input's grid from a probability (D, H, W).

    ``prob_affine`` maps a ``prob`` index to world mm, ``input_affine`` an input index to world
    mm; each input voxel centre takes the trilinearly interpolated probability (0 outside
    ``prob``), thresholded at ``threshold`` (> 0). Only the input voxels that can reach the
    threshold are interpolated: a trilinear value is a convex combination of the 8 voxels
    around it, so it is below ``threshold`` wherever all of them are; the box of ``prob``
    voxels at or above it, grown by one voxel, is mapped to the input grid and the rest of
    the mask is 0. The result equals interpolating every input voxel.
    """
    mask = np.zeros(tuple(input_shape), np.uint8)
    above = np.argwhere(metrics.binarize(prob, threshold))
    if above.size == 0:
        return mask
    index_map = np.linalg.inv(prob_affine) @ input_affine  # input index -> prob index
    lo, hi = above.min(axis=0) - 1.0, above.max(axis=0) + 1.0
    corners = np.array(list(itertools.product(*zip(lo, hi, strict=True))))  # (8, 3) prob index
    back = np.linalg.inv(index_map)  # prob index -> input index
    mapped = corners @ back[:3, :3].T + back[:3, 3]
    first = np.clip(np.floor(mapped.min(axis=0)).astype(int), 0, np.array(input_shape))
    last = np.clip(np.ceil(mapped.max(axis=0)).astype(int) + 1, 0, np.array(input_shape))
    if np.any(last <= first):
        return mask
    offset = index_map[:3, :3] @ first + index_map[:3, 3]
    moved = ndimage.affine_transform(prob.astype(np.float32), index_map[:3, :3], offset,
                                     output_shape=tuple(last - first), order=1,
                                     mode="constant", cval=0.0)
    mask[tuple(slice(a, b) for a, b in zip(first, last, strict=True))] = metrics.binarize(
        moved, threshold)
    return mask
