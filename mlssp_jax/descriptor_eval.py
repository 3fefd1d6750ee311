"""The descriptor classifier in every fold's whole-scan pipeline, and added to a finished run.

Per fold (:func:`fit_fold`, called by training when ``descriptors.classifier`` is on and the
model segments): the lesion descriptors (:mod:`mlssp_jax.descriptors`) of the TRUE masks of
the fold's training folds (its training and inner-validation subjects, the k - 1 folds
:mod:`mlssp_jax.descriptor_cv` fits on; nothing is selected on the inner validation), read
from the preprocessed npz; an L2 logistic regression on them
(:mod:`mlssp_jax.descriptor_classifier`) saved as ``W/fold_K/descriptor_classifier.json``.
At test time it sees only what the pipeline found: the descriptors of the largest component
of each held-out scan's post-processed whole-scan mask (no true mask), giving eval.json's
``whole_scan.descriptor_classification`` (:func:`mlssp_jax.wholescan_eval.descriptor_block`:
``classification``'s keys and ``per_subject`` rows).

Post hoc, on a run trained without it (``python -m mlssp_jax.evaluate --workdir W
--descriptors``, :func:`add_to_run`): for each finished fold whose eval.json has a
``whole_scan`` block but no ``descriptor_classification``, fit the fold's classifier as
above, predict the held-out whole scans again with the fold's best checkpoint and saved
post-processing rule (the masks are not stored), and add the block to eval.json (rewritten
atomically; the other keys are left as they are). Nothing is written until every pending
fold is done: a failure leaves the run as it was. The recomputed whole-scan DSC is compared
with the stored one, and a difference logged as a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mlssp_jax import (
    checkpointing,
    descriptor_cv,
    manifest,
    models,
    parallel,
    patches,
    postprocess,
    preprocess,
    rundir,
    splits,
    wholescan_eval,
)
from mlssp_jax import config as config_lib
from mlssp_jax import descriptor_classifier as clf
from mlssp_jax.errors import InputError
from mlssp_jax.train_step import make_predict_fn

log = logging.getLogger(__name__)

BLOCK = "descriptor_classification"  # the key inside eval.json's whole_scan block
DSC_TOLERANCE = 1e-4  # recomputed vs stored whole-scan DSC: larger differences are logged


def applies(config: config_lib.Config) -> bool:
    """Whether training fits the descriptor classifier: switched on and a segmenting model."""
    return config.descriptors.classifier and models.has_tasks(config.model.name)[0]


def training_rows(subjects: Sequence[Mapping], config: config_lib.Config) -> list[dict]:
    """``subject_id``, ``label`` and the true-mask descriptors of each of ``subjects``
    (``subject_id``, ``label``, ``path``: the preprocessed npz)."""
    return [{"subject_id": s["subject_id"], "label": int(s["label"]),
             **descriptor_cv.scan_descriptors(Path(s["path"]), config)} for s in subjects]


def fit_fold(config: config_lib.Config, subjects: Sequence[Mapping], workdir: Path,
             fold: int, save: bool = True) -> clf.DescriptorClassifier:
    """Fit the fold's descriptor classifier on ``subjects`` (its training folds, see
    :func:`training_rows`) and (if ``save``) save it as ``W/fold_K/descriptor_classifier.json``."""
    rows = training_rows(subjects, config)
    x = clf.design_matrix(rows, clf.DEFAULT_FEATURES)
    y = np.array([r["label"] for r in rows], dtype=float)
    model = clf.fit(x, y, config.descriptors.l2_penalty)
    if save and parallel.is_main_process():
        model.save(rundir.descriptor_classifier_path(workdir, fold))
    log.info("fold %d: descriptor classifier fitted on the true masks of %d training "
             "subjects", fold, len(rows))
    return model


def load_fold_models(workdir: Path, folds: Sequence[int]) -> list[clf.DescriptorClassifier]:
    """The saved descriptor classifiers of ``folds`` (folds without one are left out)."""
    paths = [rundir.descriptor_classifier_path(workdir, k) for k in folds]
    return [clf.DescriptorClassifier.load(p) for p in paths if p.is_file()]


def _pending(workdir: Path, cfg: config_lib.Config) -> dict[int, dict]:
    """Finished folds whose eval.json has a whole-scan block without the descriptor block."""
    evals, _ = rundir.read_evals(workdir, cfg.train.num_folds)
    for fold, record in evals.items():
        if not record.get("whole_scan"):
            log.warning("%s: no whole_scan block (a run made before it); fold %d skipped",
                        rundir.eval_path(workdir, fold), fold)
    return {k: e for k, e in evals.items() if e.get("whole_scan")
            and e["whole_scan"].get(BLOCK) is None}


def _fold_volumes(cfg: config_lib.Config, workdir: Path
                  ) -> tuple[dict, list[dict], dict, dict]:
    """The run's preprocessed cohort (``{id: npz}``), saved folds, ``{id: label}`` and
    ``{id: mask on the scan's own grid}``."""
    manifest_path = preprocess.resolve_data(cfg.data)
    subjects = manifest.read_manifest(manifest_path, require_masks=True)
    ids, labels = [s.subject_id for s in subjects], [s.label for s in subjects]
    t = cfg.train
    folds = splits.check_saved(workdir, ids, labels, t.num_folds, t.inner_val_fraction, t.seed)
    if folds is None:
        raise InputError(f"{workdir / splits.SPLITS_FILE}: no such file (not a trained run?)")
    paths = preprocess.cached_cohort(manifest_path, cfg.data, max(t.workers, 1),
                                     subjects=subjects)
    return paths, folds, dict(zip(ids, labels, strict=True)), manifest.native_masks(subjects)


def add_to_run(workdir: str | Path) -> list[int]:
    """Add ``whole_scan.descriptor_classification`` to each finished fold lacking it (see the
    module docstring); returns the folds updated. InputError for a model without
    segmentation."""
    workdir = Path(workdir)
    cfg = rundir.read_config(workdir)
    if not models.has_tasks(cfg.model.name)[0]:
        raise InputError(f"{workdir}: model '{cfg.model.name}' has no segmentation branch, "
                         "so no whole-scan lesion to describe")
    pending = _pending(workdir, cfg)
    if not pending:
        log.info("%s: every finished fold has its descriptor classification", workdir)
        return []
    paths, folds, label_of, native = _fold_volumes(cfg, workdir)
    mesh = parallel.make_mesh()
    predict_fn = make_predict_fn(cfg, mesh)
    done = {}  # fold -> (classifier, eval record): written only once every fold succeeded
    for fold, record in sorted(pending.items()):
        split = folds[fold]
        fitted = [{"subject_id": s, "label": label_of[s], "path": paths[s]}
                  for s in split["train"] + split["val"]]
        model = fit_fold(cfg, fitted, workdir, fold, save=False)
        params, _ = checkpointing.restore_best_params(workdir, fold)
        rule = postprocess.load(rundir.fold_dir(workdir, fold))
        volumes = patches.load_volumes(paths, split["test"], label_of, native)
        whole = wholescan_eval.held_out(cfg, predict_fn, params, volumes, rule, mesh, model)
        _check_same_segmentation(record["whole_scan"], whole, workdir, fold)
        record["whole_scan"][BLOCK] = whole[BLOCK]
        done[fold] = (model, record)
        log.info("fold %d: descriptor classifier on %d held-out whole scans: AUC %s", fold,
                 len(volumes), whole[BLOCK]["auc"])
    if parallel.is_main_process():
        for fold, (model, record) in done.items():
            model.save(rundir.descriptor_classifier_path(workdir, fold))
            rundir.write_eval(workdir, fold, record)
    return sorted(pending)


def _check_same_segmentation(stored: dict, recomputed: dict, workdir: Path, fold: int) -> None:
    """Warn if the held-out masks predicted now differ from training's (another code version)."""
    before = (stored.get("segmentation") or {}).get("dsc")
    now = recomputed["segmentation"]["dsc"]
    if before is None or now is None or abs(before - now) > DSC_TOLERANCE:
        log.warning("%s: whole-scan DSC recomputed %s, stored %s: the masks the descriptors were "
                    "measured on differ from training's", rundir.eval_path(workdir, fold), now,
                    before)


__all__ = ["BLOCK", "add_to_run", "applies", "fit_fold", "load_fold_models", "training_rows"]
