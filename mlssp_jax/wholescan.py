"""Whole-scan evaluation: what a user gets on a new scan, beside the paper's lesion-centred VOI.

For each subject: Gaussian-weighted sliding windows over the brain's bounding box of the
preprocessed volume (:func:`inference.sliding_window_predict`), ``prob > threshold``, the
run's post-processing (:mod:`mlssp_jax.postprocess`, always inside the brain), then
:func:`subject_metrics` on the preprocessed grid: DSC, HD95 (mm), absolute volume error (mL),
false-positive volume (mL of predicted voxels more than ``FP_DISTANCE_MM`` from the true
lesion) and ``detected`` (a predicted voxel, hence a component, overlaps the lesion); and,
where the volume names its mask on the scan's own grid (``native_mask_path``), ``dsc_native``,
``volume_error_native_ml`` and both volumes (``volume_native_ml``, what ``predict`` reports,
and ``true_volume_native_ml``) in that space, the mask resampled there as ``predict`` writes
it (:func:`native_metrics`: what a user's mask would score against the reference mask). The
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

from mlssp_jax import descriptors, inference, metrics, nifti, postprocess

FP_DISTANCE_MM = 10.0  # SPEC.md: predicted voxels farther than this from the lesion are false
SEG_KEYS = ("dsc", "hd95_mm", "volume_error_ml", "false_positive_ml", "detected",
            "dsc_native", "volume_error_native_ml")
NO_NATIVE = {"dsc_native": None, "volume_error_native_ml": None, "volume_native_ml": None,
             "true_volume_native_ml": None}


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


def false_positive_ml(pred: np.ndarray, truth: np.ndarray, spacing_mm: float | Sequence[float],
                      distance_mm: float = FP_DISTANCE_MM) -> float:
    """mL of ``pred`` voxels farther than ``distance_mm`` from every ``truth`` voxel (all of
    ``pred`` if ``truth`` is empty); ``spacing_mm``: the voxel size, isotropic or per axis."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (pred.ndim,))
    if not truth.any():
        far = pred
    else:
        far = pred & (ndimage.distance_transform_edt(~truth, sampling=spacing) > distance_mm)
    return float(np.count_nonzero(far)) * float(np.prod(spacing)) / 1000.0


def subject_metrics(pred: np.ndarray, truth: np.ndarray, spacing_mm: float) -> dict[str, Any]:
    """Whole-scan metrics of one subject (see the module docstring); HD95 inf -> None."""
    seg = metrics.segmentation_metrics(pred, truth, (spacing_mm,) * 3)
    hd95 = seg["hd95_mm"]
    return {"dsc": seg["dsc"], "hd95_mm": hd95 if math.isfinite(hd95) else None,
            "volume_error_ml": seg["volume_error_ml"],
            "false_positive_ml": false_positive_ml(pred, truth, spacing_mm),
            "detected": bool(np.any(np.asarray(pred, bool) & np.asarray(truth, bool)))}


def kept_probability(prob: np.ndarray, kept: np.ndarray, threshold: float) -> np.ndarray:
    """``prob`` (D, H, W) with the voxels at or above ``threshold`` that post-processing did
    not keep (outside the bool mask ``kept``) set to 0: removed components become background,
    so resampling it cannot bring them back."""
    return np.where(metrics.binarize(prob, threshold) & ~kept, 0.0, prob)


def native_metrics(volume: dict, prob: np.ndarray, mask: np.ndarray,
                   threshold: float) -> dict[str, float | None]:
    """``dsc_native``, ``volume_error_native_ml`` (absolute, mL), ``volume_native_ml`` (the
    mask's, as ``predict`` reports it) and ``true_volume_native_ml`` of one volume in its scan's
    own space: ``prob`` (D, H, W) with the components post-processing removed set to 0 (as
    ``predict`` does), trilinearly resampled onto the grid of ``volume["native_mask_path"]``
    and thresholded at ``threshold`` (:func:`inference.resample_mask`), against that mask
    (> 0.5). :data:`NO_NATIVE` (None values) if the volume names no such mask."""
    path = volume.get("native_mask_path")
    if path is None:
        return dict(NO_NATIVE)
    native = nifti.read_volume(path)
    truth = native.data > 0.5
    pred = inference.resample_mask(kept_probability(prob, mask, threshold), volume["affine"],
                                   native.affine, truth.shape, threshold).astype(bool)
    n_pred, n_truth = int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
    return {"dsc_native": dsc(pred, truth),
            "volume_error_native_ml": abs(n_pred - n_truth) * native.voxel_volume_ml,
            "volume_native_ml": n_pred * native.voxel_volume_ml,
            "true_volume_native_ml": n_truth * native.voxel_volume_ml}


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


def validation_scores(volumes: Sequence[dict], probs: Sequence[np.ndarray],
                      rules: Sequence[dict], threshold: float) -> list[dict]:
    """Each of ``rules`` on the validation ``volumes``: ``score`` (mean DSC) and
    ``median_volume_error_ml`` (median over subjects of predicted minus true mL, signed), as
    :func:`postprocessed` masks would give. The components are labelled once per volume and
    threshold (and HU cap) and each rule's counts read off them."""
    dscs, errors = np.zeros((len(rules), len(volumes))), np.zeros((len(rules), len(volumes)))
    for j, (volume, prob) in enumerate(zip(volumes, probs, strict=True)):
        truth = np.asarray(volume["mask"], bool)
        n_truth, ml = int(np.count_nonzero(truth)), voxel_ml(volume["spacing_mm"])
        counted = {}  # (threshold, max_hu) -> (voxels, lesion voxels) of each component
        for i, rule in enumerate(rules):
            key = (postprocess.threshold_of(rule, threshold), rule.get("max_hu"))
            if key not in counted:
                found = postprocess.restrict(metrics.binarize(prob, key[0]), volume["brain"],
                                             rule, hu=volume.get("hu"))
                labels, sizes = postprocess.label(found)
                hits = np.bincount(labels[truth], minlength=sizes.size + 1)[1:]
                counted[key] = (sizes, hits)
            sizes, hits = counted[key]
            keep = postprocess.kept_components(sizes, rule, ml)
            n_pred, tp = int(sizes[keep].sum()), int(hits[keep].sum())
            dscs[i, j] = 1.0 if n_pred + n_truth == 0 else 2 * tp / (n_pred + n_truth)
            errors[i, j] = (n_pred - n_truth) * ml
    return [{"score": float(np.mean(d)), "median_volume_error_ml": float(np.median(e))}
            for d, e in zip(dscs, errors, strict=True)]


def native_volume_errors(volumes: Sequence[dict], probs: Sequence[np.ndarray],
                         rules: Sequence[dict], threshold: float) -> list[float]:
    """Each rule's median over ``volumes`` of the signed volume error (predicted minus true,
    mL) on the scans' own grids: the post-processed mask resampled as ``predict`` writes it
    (:func:`native_metrics`) against each volume's ``native_mask_path``."""
    natives = [nifti.read_volume(v["native_mask_path"]) for v in volumes]
    errors = []
    for rule in rules:
        used = postprocess.threshold_of(rule, threshold)
        per_volume = []
        for volume, prob, native in zip(volumes, probs, natives, strict=True):
            mask = postprocessed(volume, prob, rule, threshold)
            pred = inference.resample_mask(kept_probability(prob, mask, used), volume["affine"],
                                           native.affine, native.data.shape, used)
            n_truth = int(np.count_nonzero(native.data > 0.5))
            per_volume.append((int(np.count_nonzero(pred)) - n_truth) * native.voxel_volume_ml)
        errors.append(float(np.median(per_volume)))
    return errors


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
             describe: Callable[[np.ndarray, dict], dict] | None = None, native: bool = True
             ) -> tuple[dict, list[dict]]:
    """eval.json's ``whole_scan.segmentation`` block and per-subject classification rows
    (``subject_id``, ``label``, ``cls_prob``: None if the model has no classifier; with
    ``describe`` (post-processed mask, volume) -> descriptors, also ``descriptors``).
    ``native`` False leaves the scan-grid metrics out (:data:`NO_NATIVE`)."""
    per_subject, cls_rows = [], []
    for volume, prob in zip(volumes, probs, strict=True):
        mask = postprocessed(volume, prob, rule, threshold)
        threshold_used = postprocess.threshold_of(rule, threshold)
        per_subject.append({"subject_id": volume["subject_id"],
                            **subject_metrics(mask, volume["mask"], volume["spacing_mm"]),
                            **(native_metrics(volume, prob, mask, threshold_used) if native
                               else NO_NATIVE)})
        cls_rows.append({"subject_id": volume["subject_id"], "label": int(volume["label"]),
                         "cls_prob": classify(volume, prob, mask, predict_fn, window,
                                              threshold_used, batch_size)})
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
                          train_cfg, select: str | None = None) -> tuple[dict, list[dict]]:
    """The post-processing rule chosen on ``volumes`` and each candidate's scores
    (:func:`validation_scores`), among :func:`postprocess.candidates` of ``train_cfg``'s
    ``postprocess_*`` fields, by ``select`` (None: ``train_cfg.postprocess_select``;
    :func:`postprocess.choose_scored`). ``"volume_native"`` also scores the candidates of the
    best component rule on the scans' own grids (:func:`native_volume_errors`; every volume
    needs its ``native_mask_path``), the others' ``median_volume_error_native_ml`` None."""
    select = select or train_cfg.postprocess_select
    max_hu = train_cfg.postprocess_max_hu or None
    rules = postprocess.candidates(train_cfg.postprocess_min_ml,
                                   train_cfg.postprocess_thresholds, max_hu)
    scores = validation_scores(volumes, probs, rules, train_cfg.threshold)
    scored = [{"rule": rule, **score} for rule, score in zip(rules, scores, strict=True)]
    if select == "volume_native":
        if any(v.get("native_mask_path") is None for v in volumes):
            raise ValueError('postprocess_select = "volume_native" needs every validation '
                             "volume's native_mask_path")
        same = postprocess.best_component(scored)
        errors = native_volume_errors(volumes, probs, [rules[i] for i in same],
                                      train_cfg.threshold)
        for row in scored:
            row["median_volume_error_native_ml"] = None
        for i, error in zip(same, errors, strict=True):
            scored[i]["median_volume_error_native_ml"] = error
    return postprocess.choose_scored(scored, select), scored


def run(volumes: Sequence[dict], predict_fn: inference.PredictFn, cfg, overlap: float,
        rule: dict | None = None, describe: bool = False, select: str | None = None,
        native: bool = True) -> dict:
    """Whole-scan prediction and metrics of ``volumes`` under config ``cfg``.

    ``rule`` None chooses the post-processing on these volumes (inner validation), by
    ``select`` (:func:`choose_postprocessing`);
    ``describe``: measure the predicted lesion's descriptors (each row's ``descriptors``);
    ``native`` False: no scan-grid metrics (:func:`evaluate`).
    Returns ``rule``, ``scored`` (each candidate's scores, or None), ``segmentation`` (the
    block of :func:`evaluate`) and ``classification_rows``.
    """
    window, threshold = cfg.data.voi_size, cfg.train.threshold
    batch = cfg.train.batch_size
    probs = predict_volumes(volumes, predict_fn, window, overlap, batch)
    scored = None
    if rule is None:
        rule, scored = choose_postprocessing(volumes, probs, cfg.train, select)
    describer = ((lambda mask, volume: descriptors.largest_lesion_descriptors(mask, volume, cfg))
                 if describe else None)
    seg, rows = evaluate(volumes, probs, predict_fn, rule, window, threshold, batch, describer,
                         native)
    return {"rule": rule, "scored": scored, "segmentation": seg, "classification_rows": rows}
