"""Evaluation metrics (numpy, host side): segmentation per subject, classification, statistics.

Segmentation metrics start from confusion counts (as nnU-Net's evaluation does), then each
metric. Empty-mask rules, chosen so that nothing is silently dropped or flattered:

========================  ==========================================================
metric                    rule when a denominator is empty
========================  ==========================================================
dsc                       truth and prediction both empty -> 1.0; one empty -> 0.0
sensitivity (TP/(TP+FN))  empty truth -> nan (no lesion to find)
specificity (TN/(TN+FP))  truth fills the volume -> nan
ppv (TP/(TP+FP))          empty prediction -> nan
hd95_mm                   both empty -> 0.0; exactly one empty -> inf (no surface to
                          measure to: an unbounded error, kept visible in means)
volume_error_ml           always defined: ``|V_pred - V_truth|`` in mL
========================  ==========================================================

Thresholding, the one rule everywhere (segmentation voxels, classification, predict): a
probability ``p`` is positive when ``p >= threshold`` (:func:`binarize`).

Calibration: :func:`brier_score`, :func:`expected_calibration_error` and the
reliability-diagram data of :func:`reliability_bins` (equal-width probability bins).

Classification: ``sensitivity`` nan without positives, ``specificity`` nan without
negatives, ``auc`` nan unless both classes occur. :func:`mean_metrics` averages with
``nanmean`` (nan = undefined, skipped; inf stays inf).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage


class Counts(NamedTuple):
    """Confusion counts (numbers of voxels or subjects)."""

    tp: int
    fp: int
    fn: int
    tn: int


def confusion_counts(pred: np.ndarray, truth: np.ndarray) -> Counts:
    """Confusion counts of two same-shape binary arrays (any shape, nonzero = positive)."""
    pred, truth = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    if pred.shape != truth.shape:
        raise ValueError(f"pred shape {pred.shape} != truth shape {truth.shape}")
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    return Counts(tp, fp, fn, pred.size - tp - fp - fn)


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, nan when the denominator is 0 (undefined)."""
    return float(numerator / denominator) if denominator else float("nan")


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (the volume border counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def surface_distances_mm(a: np.ndarray, b: np.ndarray,
                         spacing_mm: Sequence[float]) -> np.ndarray:
    """Distance (mm) from each surface voxel of ``a`` to the nearest surface voxel of ``b``.

    Both masks non-empty, same shape; ``spacing_mm`` is the voxel size per axis.
    """
    to_b = ndimage.distance_transform_edt(~_surface(b), sampling=spacing_mm)
    return to_b[_surface(a)]


def hd95_mm(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float] = (1, 1, 1)) -> float:
    """95th percentile of the pooled symmetric surface distances, in mm (MedPy's ``hd95``).

    Both empty -> 0.0; exactly one empty -> inf (see the module docstring).
    """
    pred, truth = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return float("inf")
    distances = np.concatenate([surface_distances_mm(pred, truth, spacing_mm),
                                surface_distances_mm(truth, pred, spacing_mm)])
    return float(np.percentile(distances, 95))


def segmentation_metrics(pred: np.ndarray, truth: np.ndarray,
                         spacing_mm: Sequence[float] = (1, 1, 1)) -> dict[str, float]:
    """Per-subject metrics of a binary prediction against the truth (3-D, same shape).

    Returns ``dsc``, ``sensitivity``, ``specificity``, ``ppv`` (fractions), ``hd95_mm`` and
    ``volume_error_ml`` (absolute, with voxel volume ``prod(spacing_mm)`` mm^3).
    """
    pred, truth = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    c = confusion_counts(pred, truth)
    both_empty = c.tp + c.fp + c.fn == 0
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    return {
        "dsc": 1.0 if both_empty else _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn),
        "sensitivity": _ratio(c.tp, c.tp + c.fn),
        "specificity": _ratio(c.tn, c.tn + c.fp),
        "ppv": _ratio(c.tp, c.tp + c.fp),
        "hd95_mm": hd95_mm(pred, truth, spacing_mm),
        "volume_error_ml": abs(c.fp - c.fn) * voxel_ml,  # |(tp+fp) - (tp+fn)| voxels
    }


def mean_metrics(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean over subjects of each key, skipping nan (undefined) values; inf propagates."""
    keys = rows[0].keys() if rows else ()
    means = {}
    for key in keys:
        values = np.array([row[key] for row in rows], dtype=float)
        defined = values[~np.isnan(values)]
        means[key] = float(defined.mean()) if defined.size else float("nan")
    return means


def _stats():
    """``scipy.stats``, imported on first use: it adds ~0.5-1 s to every command's start-up
    (``predict`` needs none of it)."""
    from scipy import stats

    return stats


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC, ties counted one half (Mann-Whitney U / (n_pos n_neg)); nan if one class."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=float)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _stats().rankdata(scores)  # average ranks for ties
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray):
    """All ROC points, as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.

    Returns (fpr, tpr, thresholds): point i classifies ``scores >= thresholds[i]`` as
    positive; thresholds are the distinct scores in decreasing order after a leading inf
    (the (0, 0) point). fpr (tpr) is nan when there are no negatives (positives).
    """
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=float)
    order = np.argsort(-scores, kind="stable")
    labels, scores = labels[order], scores[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.r_[0, np.cumsum(labels)[last_of_each]]
    fps = np.r_[0, last_of_each + 1 - tps[1:]]
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = fps / fps[-1] if fps[-1] else np.full(fps.shape, np.nan)
        tpr = tps / tps[-1] if tps[-1] else np.full(tps.shape, np.nan)
    return fpr, tpr, np.r_[np.inf, scores[last_of_each]]


def binarize(prob: np.ndarray | float, threshold: float) -> np.ndarray:
    """``prob >= threshold`` (bool, same shape): the package's one thresholding rule."""
    return np.asarray(prob) >= threshold


def classification_metrics(labels: np.ndarray, probs: np.ndarray,
                           threshold: float = 0.5) -> dict[str, float]:
    """``accuracy``, ``sensitivity`` (AVM recall), ``specificity``, ``auc`` over subjects.

    A subject is predicted positive when ``prob >= threshold`` (:func:`binarize`). labels
    (N,) in {0, 1}.
    """
    labels, probs = np.asarray(labels).astype(bool), np.asarray(probs, dtype=float)
    c = confusion_counts(binarize(probs, threshold), labels)
    return {
        "accuracy": _ratio(c.tp + c.tn, labels.size),
        "sensitivity": _ratio(c.tp, c.tp + c.fn),
        "specificity": _ratio(c.tn, c.tn + c.fp),
        "auc": roc_auc(labels, probs),
    }


def brier_score(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean squared error of the probabilities, ``mean((p - y)^2)`` in [0, 1]; nan if empty."""
    labels, probs = np.asarray(labels, dtype=float), np.asarray(probs, dtype=float)
    return float(np.mean((probs - labels) ** 2)) if labels.size else float("nan")


def reliability_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> dict:
    """Reliability-diagram data over ``n_bins`` equal-width bins of [0, 1].

    Bin b holds ``b / n <= p < (b + 1) / n`` (the last bin also p = 1). Returns (n_bins,)
    arrays: ``lower``, ``upper`` (edges), ``mean_prob`` (mean p in the bin), ``frequency``
    (share of positives) and ``count``; mean_prob and frequency are nan for empty bins.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    labels, probs = np.asarray(labels, dtype=float), np.asarray(probs, dtype=float)
    index = np.clip(np.floor(probs * n_bins).astype(int), 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(index, probs, minlength=n_bins) / count
        frequency = np.bincount(index, labels, minlength=n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {"lower": edges[:-1], "upper": edges[1:], "mean_prob": mean_prob,
            "frequency": frequency, "count": count}


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """ECE: ``sum_b (n_b / N) |mean_prob_b - frequency_b|`` over the equal-width bins of
    :func:`reliability_bins` (empty bins contribute 0); nan if there are no subjects."""
    bins = reliability_bins(labels, probs, n_bins)
    n = bins["count"].sum()
    if n == 0:
        return float("nan")
    gaps = np.abs(bins["mean_prob"] - bins["frequency"])
    return float(np.sum(np.where(bins["count"] > 0, gaps, 0.0) * bins["count"]) / n)


def ece_if_calibrated(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10,
                      n_resamples: int = 2000, seed: int = 0) -> dict:
    """What the ECE of these probabilities would be if they were calibrated (consistency
    resampling, Broecker & Smith 2007): labels drawn as Bernoulli(p) for each subject's own
    probability, ``n_resamples`` times (seeded), each scored by
    :func:`expected_calibration_error`. On a few dozen subjects a perfectly calibrated model
    has an ECE well above 0 from sampling alone; this is the yardstick for the observed one.

    Returns ``median`` and ``range95`` ([2.5, 97.5] percentiles) of the calibrated ECEs and
    ``p``: the share of them at least as large as the observed ECE (small: miscalibrated beyond
    what this many subjects explain). All None if there are no subjects.
    """
    labels, probs = np.asarray(labels, dtype=float), np.asarray(probs, dtype=float)
    if probs.size == 0:
        return {"median": None, "range95": [None, None], "p": None}
    observed = expected_calibration_error(labels, probs, n_bins)
    draws = np.random.default_rng(seed).random((n_resamples, probs.size)) < probs
    calibrated = np.array([expected_calibration_error(y, probs, n_bins) for y in draws])
    low, high = np.percentile(calibrated, [2.5, 97.5])
    return {"median": float(np.median(calibrated)), "range95": [float(low), float(high)],
            "p": float(np.mean(calibrated >= observed - 1e-12))}


def bootstrap_ci(statistic: Callable[..., float], *arrays: np.ndarray, n_resamples: int = 2000,
                 confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Percentile bootstrap over subjects: (estimate, low, high).

    ``arrays`` are per-subject arrays of equal length N (e.g. labels and probabilities);
    each resample draws N subjects with replacement (seeded) and applies
    ``statistic(*resampled_arrays)``. Resamples whose statistic is nan (e.g. an AUC of a
    resample with one class) are left out; if all are, the interval is (nan, nan).
    """
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0])
    if n == 0 or any(len(a) != n for a in arrays):
        raise ValueError("bootstrap_ci needs non-empty arrays of equal length")
    indices = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    values = np.array([statistic(*(a[i] for a in arrays)) for i in indices], dtype=float)
    values = values[~np.isnan(values)]
    estimate = float(statistic(*arrays))
    if values.size == 0:
        return estimate, float("nan"), float("nan")
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return estimate, float(low), float(high)


def _midranks(x: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, ties averaged (1-based)."""
    return _stats().rankdata(x, axis=-1)


def delong_test(labels: np.ndarray, probs_a: np.ndarray,
                probs_b: np.ndarray) -> tuple[float, float, float]:
    """DeLong's test of two correlated AUCs on the same subjects: (auc_a, auc_b, p two-sided).

    Fast DeLong (Sun & Xu 2014): structural components from midranks in O(N log N).
    Needs >= 2 positives and >= 2 negatives. Identical scores give p = 1.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.stack([np.asarray(probs_a, float), np.asarray(probs_b, float)])  # (2, N)
    pos, neg = scores[:, labels], scores[:, ~labels]  # (2, m), (2, n)
    m, n = pos.shape[1], neg.shape[1]
    if m < 2 or n < 2:
        raise ValueError("delong_test needs at least 2 positive and 2 negative subjects")
    tz = _midranks(np.concatenate([pos, neg], axis=1))
    tx, ty = _midranks(pos), _midranks(neg)
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1) / (2 * n)
    v10 = (tz[:, :m] - tx) / n  # (2, m) per-positive components
    v01 = 1.0 - (tz[:, m:] - ty) / m  # (2, n) per-negative components
    cov = np.cov(v10) / m + np.cov(v01) / n  # (2, 2)
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    difference = aucs[0] - aucs[1]
    if variance <= 0:
        p = 1.0 if np.isclose(difference, 0.0) else 0.0
    else:
        p = float(2 * _stats().norm.sf(abs(difference) / np.sqrt(variance)))
    return float(aucs[0]), float(aucs[1]), p


__all__ = [
    "Counts", "bootstrap_ci", "brier_score", "classification_metrics", "confusion_counts",
    "delong_test", "expected_calibration_error", "hd95_mm", "mean_metrics", "reliability_bins",
    "roc_auc", "roc_curve", "segmentation_metrics", "surface_distances_mm",
]
