"""The training side of the whole-scan protocol: inner validation, the post-processing choice
and the held-out ``whole_scan`` block, with a jitted model and its parameters.

The metrics themselves are :mod:`mlssp_jax.wholescan`'s (numpy); this module binds the
parameters of a :func:`~mlssp_jax.train_step.make_predict_fn` model into the numpy predict
function the sliding windows call, and formats the results as :mod:`mlssp_jax.fold_eval`
formats the VOI protocol's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from mlssp_jax import config as config_lib
from mlssp_jax import fold_eval, models, parallel, postprocess, rundir, wholescan
from mlssp_jax.calibration import Calibration
from mlssp_jax.descriptor_classifier import DescriptorClassifier, lesion_probabilities
from mlssp_jax.train_step import ApplyFn

log = logging.getLogger(__name__)


def numpy_predict_fn(predict_fn: ApplyFn, params: Any, mesh: Mesh):
    """``images (B, S, S, S, 1) -> {"seg_prob", "cls_prob"}`` as numpy (None: no such task),
    ``params`` bound, for :mod:`mlssp_jax.inference`'s sliding windows."""
    def predict(images: np.ndarray) -> dict:
        rows = fold_eval._host_rows({"image": images}, "image")
        sharded = parallel.shard_batch({"image": rows}, mesh)
        out = jax.device_get(predict_fn(params, sharded["image"]))
        return {k: None if v is None else np.asarray(v) for k, v in out.items()}
    return predict


def segments(config: config_lib.Config, volumes: list[dict] | None) -> bool:
    """Whether the whole-scan protocol applies: volumes given and a model that segments."""
    return bool(volumes) and models.has_tasks(config.model.name)[0]


def score_inner_val(predict_fn: ApplyFn, params: Any, volumes: list[dict],
                    config: config_lib.Config, mesh: Mesh) -> dict:
    """Inner validation on whole scans (sliding windows with ``train.val_overlap``, the best
    post-processing rule by DSC, whatever ``train.postprocess_select``: the checkpoint is chosen
    for its segmentation, the threshold calibrated after): ``val_dsc``,
    ``val_false_positive_ml``, ``val_postprocessing``, ``val_auc``, ``val_accuracy`` and
    ``val_score`` (:func:`fold_eval.selection_score`)."""
    run = wholescan.run(volumes, numpy_predict_fn(predict_fn, params, mesh), config,
                        config.train.val_overlap, select="dsc", native=False)
    seg = run["segmentation"]
    cls = fold_eval.classification_result(run["classification_rows"], config.train.threshold)
    return {"val_dsc": seg["dsc"], "val_false_positive_ml": seg["false_positive_ml"],
            "val_postprocessing": run["rule"], "val_auc": cls and cls["auc"],
            "val_accuracy": cls and cls["accuracy"],
            "val_score": fold_eval.selection_score(seg, cls, config.train.checkpoint_tasks)}


def choose_postprocessing(config: config_lib.Config, predict_fn: ApplyFn, params: Any,
                          volumes: list[dict], workdir: Path, fold: int, mesh: Mesh
                          ) -> tuple[dict, list[dict]]:
    """The post-processing rule chosen on the inner-validation ``volumes`` by
    ``train.postprocess_select`` (``none`` without them or a segmentation), saved as
    ``W/fold_K/postprocessing.json``, and the classification rows of those scans under that
    rule (each ``label`` and ``cls_prob`` from the VOI on the predicted lesion; empty
    without volumes or a segmentation)."""
    if not segments(config, volumes):
        return dict(postprocess.NONE), []
    run = wholescan.run(volumes, numpy_predict_fn(predict_fn, params, mesh), config,
                        config.inference.overlap)
    if parallel.is_main_process():
        postprocess.save(rundir.fold_dir(workdir, fold), run["rule"], run["scored"])
    scores = [s["score"] for s in run["scored"]]
    chosen = next(s for s in run["scored"] if s["rule"] == run["rule"])
    native = chosen.get("median_volume_error_native_ml")
    log.info("post-processing chosen on %d inner-validation scans by %s: %s, mean DSC %.3f, "
             "median volume error %+.2f mL%s (%d candidates, DSC %.3f-%.3f; each in %s)",
             len(volumes), config.train.postprocess_select, postprocess.describe(run["rule"]),
             chosen["score"], chosen["median_volume_error_ml"],
             "" if native is None else f" ({native:+.2f} mL on the scans' grids)",
             len(scores), min(scores), max(scores), postprocess.FILE_NAME)
    return run["rule"], run["classification_rows"]


def held_out(config: config_lib.Config, predict_fn: ApplyFn, params: Any,
             volumes: list[dict] | None, rule: dict, mesh: Mesh,
             descriptor_model: DescriptorClassifier | None = None,
             cal: Calibration | None = None) -> dict | None:
    """eval.json's ``whole_scan`` block (SPEC.md) on ``volumes`` with post-processing ``rule``;
    None for a model without segmentation. With ``descriptor_model``, also its
    ``descriptor_classification`` (:func:`descriptor_block`). ``cal`` calibrates the
    classification branch's probabilities (recorded in ``classification.calibration``)."""
    if not segments(config, volumes):
        return None
    run = wholescan.run(volumes, numpy_predict_fn(predict_fn, params, mesh), config,
                        config.inference.overlap, rule, describe=descriptor_model is not None)
    bins = config.train.calibration_bins
    cal = cal or Calibration()
    classification = fold_eval.classification_result(
        fold_eval.calibrated(run["classification_rows"], cal), config.train.threshold, bins)
    if classification is not None:
        classification["calibration"] = cal.to_dict()
    whole = {"segmentation": run["segmentation"], "classification": classification}
    if descriptor_model is not None:
        whole["descriptor_classification"] = descriptor_block(
            descriptor_model, run["classification_rows"], config.train.threshold, bins)
    return whole


def descriptor_block(model: DescriptorClassifier, rows: list[dict], threshold: float,
                     n_bins: int) -> dict:
    """``whole_scan.descriptor_classification``: ``classification``'s shape, from ``model``
    applied to each row's ``descriptors`` (the predicted lesion's). A subject where no lesion
    was found gets the model's answer for all-missing features (each the training mean), so
    every held-out subject counts, as the CNN's fallback VOI does; ``per_subject`` marks it
    ``lesion_found`` false."""
    described = [r["descriptors"] for r in rows]
    found = lesion_probabilities([model], described)
    fallback = float(model.predict_proba(np.full((1, len(model.features)), np.nan))[0])
    preds = [{"subject_id": r["subject_id"], "label": r["label"],
              "cls_prob": fallback if p is None else p} for r, p in zip(rows, found, strict=True)]
    block = fold_eval.classification_result(preds, threshold, n_bins)
    for row, p in zip(block["per_subject"], found, strict=True):
        row["lesion_found"] = p is not None
    return block


def summary(whole: dict | None) -> str:
    """One log line's worth of a ``whole_scan`` block."""
    whole = whole or {}
    seg, cls = whole.get("segmentation"), whole.get("classification")
    described = whole.get("descriptor_classification")
    fmt = fold_eval.format_metric
    return (f"whole scan DSC {fmt(seg and seg['dsc'])} (scan grid "
            f"{fmt(seg and seg.get('dsc_native'))}), false positive "
            f"{fmt(seg and seg['false_positive_ml'])} mL, AUC {fmt(cls and cls['auc'])}"
            + (f", descriptor AUC {fmt(described['auc'])}" if described else ""))
