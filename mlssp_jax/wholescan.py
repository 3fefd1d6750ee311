"""Whole-scan evaluation: what a user gets on a new scan, beside the paper's lesion-centred VOI.

For each subject: Gaussian-weighted sliding windows over the brain's bounding box of the
preprocessed volume (:func:`inference.sliding_window_predict`), ``prob > threshold``, the
run's post-processing (:mod:`mlssp_jax.postprocess`, always inside the brain), then
:func:`subject_metrics` on the preprocessed grid: DSC, HD95 (mm), absolute volume error (mL),
false-positive volume (mL of predicted voxels more than ``FP_DISTANCE_MM`` from the true
lesion) and ``detected`` (a predicted voxel, hence a component, overlaps the lesion). The
classification comes from the VOI centred on the largest predicted lesion
(:func:`inference.classify`), which the pipeline finds itself; if asked, the lesion
descriptors of the largest post-processed component too (:mod:`mlssp_jax.descriptors`, for
the descriptor classifier). Volumes are (D, H, W).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from mlssp_jax import descriptors, inference, metrics, postprocess

FP_DISTANCE_MM = 10.0  # SPEC.md: predicted voxels farther than this from the lesion are false
SEG_KEYS = ("dsc", "hd95_mm", "volume_error_ml", "false_positive_ml", "detected")


def segment(image: np.ndarray, brain: np.ndarray, predict_fn: inference.PredictFn, window: int,
            overlap: float, batch_size: int, tta: bool = False,
            progress: bool = False) -> np.ndarray:
    """Segmentation probability (D, H, W) float32 of a preprocessed volume; 0 outside the
    brain's bounding box (the only part the sliding windows visit)."""
    box = inference.brain_box(brain, window)
    prob = np.zeros(image.shape, np.float32)
    prob[box] = inference.sliding_window_predict(image[box], predict_fn, window, overlap,
                                                 batch_size, tta, progress)
    return prob


def false_positive_ml(pred: np.ndarray, truth: np.ndarray, spacing_mm: float,
                      distance_mm: float = FP_DISTANCE_MM) -> float:
    """mL of ``pred`` voxels farther than ``distance_mm`` from every ``truth`` voxel (all of
    ``pred`` if ``truth`` is empty); ``spacing_mm`` is the isotropic voxel size."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not truth.any():
        far = pred
    else:
        far = pred & (ndimage.distance_transform_edt(~truth, sampling=spacing_mm) > distance_mm)
    return float(np.count_nonzero(far)) * spacing_mm**3 / 1000.0


def subject_metrics(pred: np.ndarray, truth: np.ndarray, spacing_mm: float) -> dict[str, Any]:
    """Whole-scan metrics of one subject (see the module docstring); HD95 inf -> None."""
    seg = metrics.segmentation_metrics(pred, truth, (spacing_mm,) * 3)
    hd95 = seg["hd95_mm"]
    return {"dsc": seg["dsc"], "hd95_mm": hd95 if math.isfinite(hd95) else None,
            "volume_error_ml": seg["volume_error_ml"],
            "false_positive_ml": false_positive_ml(pred, truth, spacing_mm),
            "detected": bool(np.any(np.asarray(pred, bool) & np.asarray(truth, bool)))}


def voxel_ml(spacing_mm: float) -> float:
    """One isotropic voxel's volume in mL."""
    return spacing_mm**3 / 1000.0


def predict_volumes(volumes: Sequence[dict], predict_fn: inference.PredictFn, window: int,
                    overlap: float, batch_size: int) -> list[np.ndarray]:
    """The segmentation probability (D, H, W) of each volume (``image``, ``brain`` keys)."""
    return [segment(v["image"], v["brain"], predict_fn, window, overlap, batch_size)
            for v in volumes]


def postprocessed(volume: dict, prob: np.ndarray, rule: dict, threshold: float) -> np.ndarray:
    """The predicted mask (bool) of one volume after ``rule`` (its own threshold if it has
    one, else ``threshold``)."""
    found = metrics.binarize(prob, postprocess.threshold_of(rule, threshold))
    return postprocess.apply(found, volume["brain"], rule, voxel_ml(volume["spacing_mm"]),
                             hu=volume.get("hu"))


def mean_dsc(volumes: Sequence[dict], probs: Sequence[np.ndarray], rule: dict,
             threshold: float) -> float:
    """Mean whole-scan DSC over subjects with ``rule`` (the post-processing choice's score)."""
    return float(np.mean([dsc(postprocessed(v, p, rule, threshold), v["mask"])
                          for v, p in zip(volumes, probs, strict=True)]))


def dsc(pred: np.ndarray, truth: np.ndarray) -> float:
    """:func:`metrics.segmentation_metrics`' DSC alone (both empty: 1), without its HD95."""
    c = metrics.confusion_counts(pred, truth)
    return 1.0 if c.tp + c.fp + c.fn == 0 else 2 * c.tp / (2 * c.tp + c.fp + c.fn)


def classify(volume: dict, prob: np.ndarray, mask: np.ndarray, predict_fn: inference.PredictFn,
             window: int, threshold: float, batch_size: int) -> float | None:
    """AVM probability from the VOI on the largest post-processed lesion (removed components
    are held just under the threshold, so they can only serve as the no-lesion fallback)."""
    below = np.nextafter(np.float32(threshold), np.float32(0))
    kept = np.where(mask, prob, np.minimum(prob, below))
    return inference.classify(volume["image"], kept, predict_fn, window, threshold,
                              batch_size)[0]


def evaluate(volumes: Sequence[dict], probs: Sequence[np.ndarray], predict_fn, rule: dict,
             window: int, threshold: float, batch_size: int,
             describe: Callable[[np.ndarray, dict], dict] | None = None
             ) -> tuple[dict, list[dict]]:
    """eval.json's ``whole_scan.segmentation`` block and per-subject classification rows
    (``subject_id``, ``label``, ``cls_prob``: None if the model has no classifier; with
    ``describe`` (post-processed mask, volume) -> descriptors, also ``descriptors``)."""
    per_subject, cls_rows = [], []
    for volume, prob in zip(volumes, probs, strict=True):
        mask = postprocessed(volume, prob, rule, threshold)
        per_subject.append({"subject_id": volume["subject_id"],
                            **subject_metrics(mask, volume["mask"], volume["spacing_mm"])})
        cls_rows.append({"subject_id": volume["subject_id"], "label": int(volume["label"]),
                         "cls_prob": classify(volume, prob, mask, predict_fn, window,
                                              postprocess.threshold_of(rule, threshold),
                                              batch_size)})
        if describe is not None:
            cls_rows[-1]["descriptors"] = describe(mask, volume)
    return segmentation_block(per_subject), cls_rows


def segmentation_block(per_subject: list[dict]) -> dict:
    """Means over subjects of :data:`SEG_KEYS` (undefined values skipped; ``detected``: the
    share found), plus ``per_subject``."""
    means = {}
    for key in SEG_KEYS:
        values = [float(row[key]) for row in per_subject if row[key] is not None]
        means[key] = float(np.mean(values)) if values else None
    return {**means, "per_subject": per_subject}


def choose_postprocessing(volumes: Sequence[dict], probs: Sequence[np.ndarray],
                          train_cfg) -> tuple[dict, list[dict]]:
    """The post-processing rule of best mean DSC on ``volumes`` and each candidate's score,
    among :func:`postprocess.candidates` of ``train_cfg``'s ``postprocess_*`` fields."""
    max_hu = train_cfg.postprocess_max_hu or None
    rules = postprocess.candidates(train_cfg.postprocess_min_ml,
                                   train_cfg.postprocess_thresholds, max_hu)
    return postprocess.choose(lambda rule: mean_dsc(volumes, probs, rule, train_cfg.threshold),
                              rules)


def run(volumes: Sequence[dict], predict_fn: inference.PredictFn, cfg, overlap: float,
        rule: dict | None = None, describe: bool = False) -> dict:
    """Whole-scan prediction and metrics of ``volumes`` under config ``cfg``.

    ``rule`` None chooses the post-processing on these volumes (inner validation);
    ``describe``: measure the predicted lesion's descriptors (each row's ``descriptors``).
    Returns ``rule``, ``scored`` (each candidate's mean DSC, or None), ``segmentation`` (the
    block of :func:`evaluate`) and ``classification_rows``.
    """
    window, threshold = cfg.data.voi_size, cfg.train.threshold
    batch = cfg.train.batch_size
    probs = predict_volumes(volumes, predict_fn, window, overlap, batch)
    scored = None
    if rule is None:
        rule, scored = choose_postprocessing(volumes, probs, cfg.train)
    describer = ((lambda mask, volume: descriptors.largest_lesion_descriptors(mask, volume, cfg))
                 if describe else None)
    seg, rows = evaluate(volumes, probs, predict_fn, rule, window, threshold, batch, describer)
    return {"rule": rule, "scored": scored, "segmentation": seg, "classification_rows": rows}
