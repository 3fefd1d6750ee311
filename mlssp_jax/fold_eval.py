"""Scoring a fold's VOIs: predictions, per-subject metrics, eval.json and predictions/.

The inner-validation score (:func:`score_inner_val`, after every epoch) picks the best
checkpoint; :func:`evaluate_fold` scores it on the held-out fold. Segmentation is the
probability thresholded with :func:`mlssp_jax.metrics.binarize` (``>= train.threshold``, or
on the held-out fold the threshold its post-processing chose on the inner validation).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from mlssp_jax import calibration, input_pipeline, metrics, parallel, rundir
from mlssp_jax import config as config_lib
from mlssp_jax.fileio import atomic_path, inside
from mlssp_jax.rundir import CLS_KEYS, SEG_KEYS
from mlssp_jax.train_step import ApplyFn


def _host_rows(batch: dict, key: str) -> np.ndarray:
    """This process's share of the rows of ``batch[key]`` (every host sees the whole batch)."""
    rows = len(batch[key]) // jax.process_count()
    start = jax.process_index() * rows
    return np.asarray(batch[key][start:start + rows])


def predict_examples(predict_fn: ApplyFn, params: Any, examples: list[dict], batch_size: int,
                     mesh: Mesh) -> list[dict]:
    """Predict un-augmented VOIs; one dict per subject in ``examples``' order.

    Each: ``subject_id``, ``label``, ``image`` and ``mask`` ``(S, S, S)``, ``seg_prob``
    ``(S, S, S)`` float32 or None, ``cls_prob`` float or None.
    """
    out = []
    for batch in input_pipeline.eval_batches(examples, batch_size):
        images = parallel.shard_batch({"image": _host_rows(batch, "image")}, mesh)["image"]
        pred = jax.device_get(predict_fn(params, images))
        for i in np.flatnonzero(np.asarray(batch["valid"])):
            out.append({
                "subject_id": str(batch["subject_id"][i]), "label": int(batch["label"][i]),
                "image": np.asarray(batch["image"][i, ..., 0]),
                "mask": np.asarray(batch["mask"][i, ..., 0]) > 0.5,
                "seg_prob": None if pred["seg_prob"] is None else pred["seg_prob"][i, ..., 0],
                "cls_prob": None if pred["cls_prob"] is None else float(pred["cls_prob"][i]),
            })
    return out


def _finite_or_none(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _mean(values: Iterable[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else None


def segmentation_result(preds: list[dict], threshold: float,
                        spacing_mm: float) -> dict | None:
    """eval.json's ``segmentation``: per-subject :data:`~mlssp_jax.rundir.SEG_KEYS` of
    ``seg_prob >= threshold`` on VOIs of ``spacing_mm`` voxels, their means and ``threshold``.

    An undefined value (a ratio over zero, or HD95 with an empty mask: infinite) is null in
    JSON and left out of the mean.
    """
    if not preds or preds[0]["seg_prob"] is None:
        return None
    per_subject = []
    for p in preds:
        m = metrics.segmentation_metrics(metrics.binarize(p["seg_prob"], threshold), p["mask"],
                                         (spacing_mm,) * 3)
        per_subject.append({"subject_id": p["subject_id"],
                            **{k: _finite_or_none(m[k]) for k in SEG_KEYS}})
    means = {k: _mean(s[k] for s in per_subject) for k in SEG_KEYS}
    return {**means, "threshold": threshold, "per_subject": per_subject}


def classification_result(preds: list[dict], threshold: float, n_bins: int = 10) -> dict | None:
    """eval.json's ``classification``: accuracy, sensitivity, specificity, AUC at ``threshold``,
    and the calibration: ``brier`` and ``ece`` (``n_bins`` equal-width bins)."""
    if not preds or preds[0]["cls_prob"] is None:
        return None
    labels = np.array([p["label"] for p in preds])
    probs = np.array([p["cls_prob"] for p in preds])
    m = metrics.classification_metrics(labels, probs, threshold=threshold)
    calibration_metrics = {"brier": metrics.brier_score(labels, probs),
                           "ece": metrics.expected_calibration_error(labels, probs, n_bins)}
    return {**{k: _finite_or_none(m[k]) for k in CLS_KEYS},
            **{k: _finite_or_none(v) for k, v in calibration_metrics.items()},
            "threshold": threshold,
            "per_subject": [{"subject_id": p["subject_id"], "label": p["label"],
                             "prob": p["cls_prob"]} for p in preds]}


def selection_score(seg: dict | None, cls: dict | None, tasks: str = "both") -> float:
    """The inner-validation score that picks the best checkpoint (higher is better).

    ``tasks`` (``train.checkpoint_tasks``): ``"both"``, the mean over the model's tasks of the
    mean DSC (segmentation) and the AUC (classification; the accuracy when the AUC is
    undefined, i.e. one class only); ``"segmentation"``, the DSC alone (the AUC alone for
    a model that does not segment).
    """
    parts = []
    if seg is not None:
        parts.append(seg["dsc"] if seg["dsc"] is not None else 0.0)
    if cls is not None and (tasks == "both" or seg is None):
        parts.append(cls["auc"] if cls["auc"] is not None else cls["accuracy"] or 0.0)
    return float(np.mean(parts))


def score_inner_val(predict_fn: ApplyFn, params: Any, examples: list[dict],
                    config: config_lib.Config, mesh: Mesh) -> dict:
    """Inner-validation ``val_dsc``, ``val_auc``, ``val_accuracy`` (None: no such task) and
    ``val_score`` (:func:`selection_score`)."""
    preds = predict_examples(predict_fn, params, examples, config.train.batch_size, mesh)
    seg = segmentation_result(preds, config.train.threshold, config.data.spacing_mm)
    cls = classification_result(preds, config.train.threshold, config.train.calibration_bins)
    return {"val_dsc": seg and seg["dsc"], "val_auc": cls and cls["auc"],
            "val_accuracy": cls and cls["accuracy"],
            "val_score": selection_score(seg, cls, config.train.checkpoint_tasks)}


def save_predictions(out_dir: Path, preds: list[dict], threshold: float) -> None:
    """``<subject_id>.npz`` per subject: VOI ``image`` (S, S, S) float32, ``mask`` uint8 truth,
    ``pred`` uint8 and ``prob`` float16 (if the model segments), ``label``, ``cls_prob``
    (NaN if the model does not classify)."""
    for p in preds:
        arrays = {"image": p["image"].astype(np.float32), "mask": p["mask"].astype(np.uint8),
                  "label": np.int8(p["label"]),
                  "cls_prob": np.float32(np.nan if p["cls_prob"] is None else p["cls_prob"])}
        if p["seg_prob"] is not None:
            arrays["pred"] = metrics.binarize(p["seg_prob"], threshold).astype(np.uint8)
            arrays["prob"] = p["seg_prob"].astype(np.float16)
        with atomic_path(inside(out_dir, out_dir / f"{p['subject_id']}.npz")) as tmp:
            np.savez_compressed(tmp, **arrays)


def fit_calibration(config: config_lib.Config, rows: list[dict]) -> calibration.Calibration:
    """``train.calibration`` fitted on inner-validation ``rows`` (each ``label`` and
    ``cls_prob``; a model without classification, or no rows: the identity)."""
    if not rows or rows[0]["cls_prob"] is None:
        return calibration.Calibration()
    labels = np.array([r["label"] for r in rows])
    probs = np.array([r["cls_prob"] for r in rows])
    return calibration.fit(config.train.calibration, labels, probs)


def fit_fold_calibration(config: config_lib.Config, predict_fn: ApplyFn, params: Any,
                         examples: list[dict], mesh: Mesh) -> calibration.Calibration:
    """:func:`fit_calibration` on the inner-validation VOIs ``examples``."""
    if config.train.calibration == "none":
        return calibration.Calibration()
    return fit_calibration(config, predict_examples(predict_fn, params, examples,
                                                    config.train.batch_size, mesh))


def calibrated(rows: list[dict], cal: calibration.Calibration) -> list[dict]:
    """``rows`` with ``cls_prob`` calibrated by ``cal`` (the same list for the identity)."""
    if cal.method == "none" or not rows or rows[0]["cls_prob"] is None:
        return rows
    probs = cal.apply(np.array([r["cls_prob"] for r in rows]))
    return [{**r, "cls_prob": float(p)} for r, p in zip(rows, probs, strict=True)]


def evaluate_fold(config: config_lib.Config, predict_fn: ApplyFn, params: Any,
                  examples: list[dict], workdir: Path, fold: int, mesh: Mesh,
                  cal: calibration.Calibration | None = None, whole_scan: dict | None = None,
                  seg_threshold: float | None = None) -> dict:
    """Predict the held-out VOIs with ``predict_fn`` (the one compiled for validation, from
    :func:`~mlssp_jax.train_step.make_predict_fn`); write ``W/fold_K/eval.json`` (SPEC.md,
    with the ``whole_scan`` block given, :mod:`mlssp_jax.wholescan_eval`) and
    ``W/fold_K/predictions/``.

    ``cal`` (:func:`fit_fold_calibration`; None: the identity) calibrates the
    classification probabilities; it is recorded in ``classification.calibration``.
    ``seg_threshold``: the segmentation probability threshold (None: ``train.threshold``;
    training passes the one the fold's post-processing chose on its inner validation, so that
    both protocols score the same calibrated model), recorded in ``segmentation.threshold``.
    """
    preds = predict_examples(predict_fn, params, examples, config.train.batch_size, mesh)
    cal = cal or calibration.Calibration()
    preds = calibrated(preds, cal)
    threshold = config.train.threshold
    seg_threshold = threshold if seg_threshold is None else seg_threshold
    classification = classification_result(preds, threshold, config.train.calibration_bins)
    if classification is not None:
        classification["calibration"] = cal.to_dict()
    result = {"fold": fold, "alpha": config.train.alpha, "model": config.model.name,
              "segmentation": segmentation_result(preds, seg_threshold, config.data.spacing_mm),
              "classification": classification, "whole_scan": whole_scan}
    if parallel.is_main_process():
        save_predictions(rundir.predictions_dir(workdir, fold), preds, seg_threshold)
        rundir.write_eval(workdir, fold, result)
    return result


def format_metric(value: float | None) -> str:
    """A metric for a log line: 3 decimals, or n/a when undefined."""
    return "n/a" if value is None else f"{value:.3f}"


def held_out_summary(result: dict) -> str:
    """One log line's worth of an eval.json: held-out DSC, AUC, accuracy."""
    seg, cls = result["segmentation"], result["classification"]
    fmt = format_metric
    return (f"held-out DSC {fmt(seg and seg['dsc'])}, HD95 {fmt(seg and seg['hd95_mm'])} mm, "
            f"AUC {fmt(cls and cls['auc'])}, accuracy {fmt(cls and cls['accuracy'])}")

