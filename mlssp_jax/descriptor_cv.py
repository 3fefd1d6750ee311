"""Cross-validated AVM classification from lesion descriptors of a cohort's true masks.

``python -m mlssp_jax.descriptor_cv [--config C] [--data MANIFEST] --out DIR [--set K=V]``
measures :mod:`mlssp_jax.descriptors` on every preprocessed scan around its true lesion
mask, then fits :mod:`mlssp_jax.descriptor_classifier` on k - 1 folds and predicts the
k-th, over the same seeded stratified folds training uses (``train.num_folds``,
``train.seed``). Writes ``DIR/descriptors.json`` (per subject) and ``DIR/descriptor_cv.json``
(pooled out-of-fold metrics with a bootstrap 95% CI of the AUC, calibration, and the
coefficients of a model fitted on every subject) and that model as
``DIR/descriptor_classifier.json`` (:meth:`DescriptorClassifier.load`). No network.

This is the classifier's ceiling (true masks at test time too); the whole-scan pipeline's
version, applied to the lesion each fold's network predicts, is :mod:`mlssp_jax.descriptor_eval`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mlssp_jax import config as config_lib
from mlssp_jax import descriptor_classifier as clf
from mlssp_jax import manifest, metrics, preprocess, splits
from mlssp_jax.cli import ArgumentParser, run_command, setup_logging
from mlssp_jax.descriptors import lesion_descriptors
from mlssp_jax.fileio import write_json

log = logging.getLogger(__name__)


def scan_descriptors(npz_path: Path, config: config_lib.Config) -> dict:
    """Descriptors of one preprocessed scan's true lesion (``hu`` used if the file has it)."""
    with np.load(npz_path) as f:
        hu = f["hu"] if "hu" in f.files else None
        return lesion_descriptors(f["mask"], f["brain"], image=f["image"], hu=hu,
                                  spacing_mm=config.data.spacing_mm,
                                  window_hu=(config.data.window_level_hu,
                                             config.data.window_width_hu),
                                  cfg=config.descriptors)


def cohort_descriptors(config: config_lib.Config) -> list[dict]:
    """One row per subject: ``subject_id``, ``label`` and the descriptors of its true mask."""
    manifest_path = preprocess.resolve_data(config.data)
    subjects = manifest.read_manifest(manifest_path, require_masks=True)
    paths = preprocess.cached_cohort(manifest_path, config.data, max(config.train.workers, 1))
    return [{"subject_id": s.subject_id, "label": int(s.label),
             **scan_descriptors(paths[s.subject_id], config)} for s in subjects]


def cross_validate(rows: list[dict], config: config_lib.Config,
                   features: Sequence[str] = clf.DEFAULT_FEATURES) -> dict:
    """Pooled out-of-fold ``accuracy``, ``sensitivity``, ``specificity``, ``auc`` (with
    ``auc_ci95``), ``brier``, ``ece``, ``per_subject`` probabilities, and the model fitted
    on all rows (``model``, as JSON) with its coefficients (per standard deviation)."""
    t = config.train
    ids = [r["subject_id"] for r in rows]
    y = np.array([r["label"] for r in rows], dtype=float)
    x = clf.design_matrix(rows, features)
    position = {sid: i for i, sid in enumerate(ids)}
    folds = splits.make_folds(ids, y.astype(int).tolist(), t.num_folds, t.seed)
    tests = [np.array([position[sid] for sid in fold]) for fold in folds]
    l2 = config.descriptors.l2_penalty
    probs = clf.cross_validated_probs(x, y, tests, l2, features)
    result = metrics.classification_metrics(y, probs, threshold=t.threshold)
    _, low, high = metrics.bootstrap_ci(metrics.roc_auc, y, probs, seed=t.seed)
    full = clf.fit(x, y, l2, features)
    return {**result, "model": full.to_dict(), "auc_ci95": [low, high],
            "brier": metrics.brier_score(y, probs),
            "ece": metrics.expected_calibration_error(y, probs, t.calibration_bins),
            "threshold": t.threshold, "num_folds": t.num_folds, "l2_penalty": l2,
            "coefficients": dict(zip(features, full.coef.tolist(), strict=True)),
            "intercept": full.intercept,
            "per_subject": [{"subject_id": sid, "label": int(label), "prob": float(p)}
                            for sid, label, p in zip(ids, y, probs, strict=True)]}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mlssp_jax.descriptor_cv``: descriptors and their cross-validated AUC."""
    parser = ArgumentParser(prog="python -m mlssp_jax.descriptor_cv",
                            description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, help="TOML config (default: built-in defaults)")
    parser.add_argument("--data", help="manifest CSV (default: the built-in synthetic cohort)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    setup_logging()
    overrides = list(args.set) + ([f"data.manifest={args.data}"] if args.data else [])
    config = config_lib.load(args.config, overrides)
    rows = cohort_descriptors(config)
    result = cross_validate(rows, config)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "descriptors.json", rows)
    write_json(args.out / "descriptor_cv.json", {k: v for k, v in result.items() if k != "model"})
    write_json(args.out / "descriptor_classifier.json", result["model"])
    log.info("descriptor classifier, %d subjects, %d folds pooled: AUC %.3f (95%% CI %.3f-%.3f), "
             "accuracy %.3f, sensitivity %.3f, specificity %.3f, Brier %.3f, ECE %.3f",
             len(rows), config.train.num_folds, result["auc"], *result["auc_ci95"],
             result["accuracy"], result["sensitivity"], result["specificity"],
             result["brier"], result["ece"])
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
