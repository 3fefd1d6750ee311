"""Whole-volume inference as a few pure functions (nnU-Net's sliding-window scheme).

Volumes are 3-D arrays ``(D, H, W)`` on the preprocessed 1 mm grid; a ``predict_fn`` takes a
batch of windows ``(B, S, S, S, 1)`` float32 and returns ``{"seg_prob": (B, S, S, S[, 1]) | None,
"cls_prob": (B,) | None}`` (probabilities in [0, 1]), as ``train_step.make_predict_fn`` does once
its parameters are bound.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from mlssp_jax import augment, masks, metrics, voi

PredictFn = Callable[[np.ndarray], dict]


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


def _seg_prob(predict_fn: PredictFn, patches: np.ndarray) -> np.ndarray:
    """(B, S, S, S) segmentation probabilities of a batch of windows (B, S, S, S)."""
    prob = predict_fn(patches[..., None])["seg_prob"]
    if prob is None:
        raise ValueError("the model has no segmentation output")
    return np.asarray(prob, dtype=np.float32).reshape(patches.shape)


def _tta_seg_prob(predict_fn: PredictFn, patches: np.ndarray) -> np.ndarray:
    """Mean over the 48 cube symmetries of the un-transformed predictions, (B, S, S, S)."""
    total = np.zeros(patches.shape, np.float32)
    for index in range(augment.NUM_SYMMETRIES):
        moved = np.stack([augment.symmetry(index, p) for p in patches])
        prob = _seg_prob(predict_fn, moved)
        back = augment.inverse(index)
        total += np.stack([augment.symmetry(back, p) for p in prob])
    return total / augment.NUM_SYMMETRIES


def sliding_window_predict(volume: np.ndarray, predict_fn: PredictFn, window: int,
                           overlap: float = 0.5, batch_size: int = 2,
                           tta: bool = False, progress: bool = False) -> np.ndarray:
    """Segmentation probability (D, H, W) float32 of a whole volume (D, H, W).

    Windows of ``window``^3 voxels slide with the given overlap; their predictions are averaged
    with Gaussian weights. An axis shorter than the window is zero-padded (then cropped back).
    ``tta`` averages each window over the 48 cube symmetries (48x the compute). Batches are
    always ``batch_size`` windows (the last one zero-filled) so a jitted model compiles once.
    ``progress`` shows a progress bar over the batches.
    """
    pad = [(0, max(0, window - s)) for s in volume.shape]
    padded = np.pad(volume.astype(np.float32), pad)
    weights = gaussian_importance(window)
    total = np.zeros(padded.shape, np.float32)
    norm = np.zeros(padded.shape, np.float32)
    starts = list(itertools.product(*sliding_window_steps(padded.shape, window, overlap)))
    predict = _tta_seg_prob if tta else _seg_prob
    batches = range(0, len(starts), batch_size)
    for first in tqdm(batches, desc="windows", unit="batch", leave=False, disable=not progress):
        chunk = starts[first:first + batch_size]
        boxes = [tuple(slice(s, s + window) for s in start) for start in chunk]
        batch = np.zeros((batch_size,) + (window,) * 3, np.float32)  # fixed shape: one compile
        batch[:len(boxes)] = [padded[box] for box in boxes]
        probs = predict(predict_fn, batch)
        for box, prob in zip(boxes, probs[:len(boxes)], strict=True):
            total[box] += prob * weights
            norm[box] += weights
    out = total / norm
    return out[tuple(slice(0, s) for s in volume.shape)]


def ensemble(predict_fns: Sequence[PredictFn]) -> PredictFn:
    """One predict_fn whose outputs are the mean of the given ones' (e.g. one per fold).

    An output that is ``None`` for the models (a task they lack) stays ``None``.
    """
    if not predict_fns:
        raise ValueError("ensemble of no models")

    def predict(images: np.ndarray) -> dict:
        outputs = [fn(images) for fn in predict_fns]
        return {key: None if outputs[0][key] is None
                else np.mean([np.asarray(o[key], np.float32) for o in outputs], axis=0)
                for key in outputs[0]}

    return predict


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
