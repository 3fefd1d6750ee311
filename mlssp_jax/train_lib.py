"""The training loop of one cross-validation fold: data, epochs, checkpoints, then evaluation.

:func:`train_and_evaluate` checks the run directory, loads the fold's VOIs, trains epoch by
epoch (:mod:`mlssp_jax.train_step`), scores the inner-validation VOIs after every epoch and
keeps the best checkpoint by that score (:mod:`mlssp_jax.fold_eval`), which is evaluated on
the held-out fold at the end. Files go where :mod:`mlssp_jax.rundir` says.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh
from tqdm import tqdm

from mlssp_jax import (
    augment,
    calibration,
    checkpointing,
    descriptor_eval,
    fold_eval,
    input_pipeline,
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
from mlssp_jax.errors import InputError, TrainingDiverged
from mlssp_jax.ops import conv_ops
from mlssp_jax.train_step import (
    TrainState,
    create_train_state,
    eval_params,
    fold_class_weights,
    make_predict_fn,
    make_train_step,
)

log = logging.getLogger(__name__)


def train_epoch(train_step: Callable, state: TrainState, examples: list[dict],
                config: config_lib.Config, epoch: int, mesh: Mesh) -> tuple[TrainState, dict]:
    """One pass over this host's batches of epoch ``epoch`` (0-based); mean losses over the steps.

    Raises :class:`TrainingDiverged` naming the step if the loss is NaN or infinite.
    """
    batches = input_pipeline.train_batches(
        examples, config, config.train.seed, epoch,
        process_index=jax.process_index(), process_count=jax.process_count())
    steps = input_pipeline.steps_per_epoch(len(examples) * config.train.patches_per_subject,
                                           config.train.batch_size)
    sums: dict[str, float] = {}
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}", unit="step", leave=False,
               disable=not parallel.is_main_process())
    start = time.perf_counter()
    for batch in batches:
        state, step_metrics = train_step(state, parallel.shard_batch(batch, mesh))
        step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        if not math.isfinite(step_metrics["loss"]):
            bar.close()
            raise TrainingDiverged(f"loss is {step_metrics['loss']} at step {int(state.step)} "
                                   f"(epoch {epoch + 1})")
        sums = {k: sums.get(k, 0.0) + v for k, v in step_metrics.items()}
        bar.update()
        rate = bar.n * config.train.batch_size / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{step_metrics['loss']:.4f}", ex_per_s=f"{rate:.1f}")
    bar.close()
    return state, {k: v / max(bar.n, 1) for k, v in sums.items()}


def steps_per_epoch(config: config_lib.Config, n_train: int, fold: int) -> int:
    """Optimiser steps per epoch for ``n_train`` training subjects; InputError if the global
    batch does not split over the devices or is larger than one epoch's samples."""
    batch = config.train.batch_size
    parallel.check_batch_size(batch, parallel.make_mesh())
    steps = input_pipeline.steps_per_epoch(n_train * config.train.patches_per_subject, batch)
    if steps < 1:
        raise InputError(f"train.batch_size: {batch} is more than the {n_train} training "
                         f"subjects of fold {fold}")
    return steps


def load_fold_data(config: config_lib.Config, workdir: Path, fold: int) -> dict[str, list[dict]]:
    """The fold's ``train``/``val``/``test`` VOI examples (split saved in ``W/splits.json``),
    ``val_volumes``/``test_volumes`` (:func:`patches.load_volumes`, for the whole-scan
    protocol) and ``training_subjects`` (``subject_id``, ``label``, ``path`` of the npz: the
    training folds, for :func:`descriptor_eval.fit_fold`); ``train`` holds whole volumes
    instead for ``data.sampling = "whole_volume"``."""
    manifest_path = preprocess.resolve_data(config.data)
    subjects = manifest.read_manifest(manifest_path, require_masks=True)
    manifest.check_folds(subjects, config.train.num_folds, where=str(manifest_path))
    ids = [s.subject_id for s in subjects]
    labels = [s.label for s in subjects]
    t = config.train
    # before the (slow) preprocessing and before splits.json is written: a workdir split for
    # other subjects, or a batch the fold cannot fill, is refused now
    saved = splits.check_saved(workdir, ids, labels, t.num_folds, t.inner_val_fraction, t.seed)
    planned = (saved[fold] if saved is not None else
               splits.fold_split(ids, labels, fold, t.num_folds, t.inner_val_fraction, t.seed))
    steps_per_epoch(config, len(planned["train"]), fold)
    # train.workers = 0 preprocesses in this process, as the loader does (cached_cohort would
    # read 0 as one process per CPU)
    paths = preprocess.cached_cohort(manifest_path, config.data, max(config.train.workers, 1),
                                     subjects=subjects)
    split = splits.load_or_create(workdir, ids, labels, t.num_folds, t.inner_val_fraction,
                                  t.seed)[fold]
    label_of = dict(zip(ids, labels, strict=True))
    margins = {"train": augment.jitter_voxels(config.augment, config.data.spacing_mm),
               "val": 0, "test": 0}
    background = config.augment.background_fraction > 0  # whole training volumes needed
    whole = config.data.sampling == "whole_volume"
    data = {part: input_pipeline.load_examples(paths, ids_, label_of, config.data.voi_size,
                                               margin=margins[part],
                                               whole_volumes=background and part == "train")
            for part, ids_ in split.items() if not (whole and part == "train")}
    if whole:
        data["train"] = patches.load_volumes(paths, split["train"], label_of)
    native = manifest.native_masks(subjects)
    data["val_volumes"] = patches.load_volumes(  # scan grids: for a selection made there
        paths, split["val"], label_of,
        native if config.train.postprocess_select == "volume_native" else None)
    data["test_volumes"] = patches.load_volumes(paths, split["test"], label_of, native)
    data["training_subjects"] = [{"subject_id": s, "label": label_of[s], "path": paths[s]}
                                 for s in split["train"] + split["val"]]
    return data


def start_or_resume(manager: Any, state: TrainState, workdir: Path, fold: int,
                    resume: bool) -> tuple[TrainState, int]:
    """Restore the latest checkpoint (``resume``) or start fresh; returns (state, finished epochs).

    ``metrics.jsonl`` is rewritten to hold exactly the epochs of the restored checkpoint.
    """
    latest = manager.latest_step()
    records: list[dict] = []
    if latest is not None:
        if not resume:
            raise InputError(f"{rundir.fold_dir(workdir, fold)}: already has checkpoints; "
                             "pass --resume to continue or use a new --workdir")
        state, meta = checkpointing.restore(manager, latest, state)
        records = [r for r in rundir.read_metrics(workdir, fold) if r["epoch"] < latest]
        records.append(meta["record"])
        log.info("resuming %s after epoch %d (step %d)", rundir.fold_dir(workdir, fold), latest,
                 int(state.step))
    if parallel.is_main_process():
        rundir.write_metrics(workdir, fold, records)
    return state, latest or 0


def append_metrics(workdir: Path, fold: int, record: dict) -> None:
    """Add one epoch's record to ``W/fold_K/metrics.jsonl`` (rewritten atomically)."""
    if parallel.is_main_process():
        rundir.write_metrics(workdir, fold, rundir.read_metrics(workdir, fold) + [record])


def epoch_record(epoch: int, state: TrainState, train_metrics: dict, val: dict,
                 seconds: float) -> dict:
    """One line of ``metrics.jsonl`` (``epoch`` counts finished epochs, from 1).

    The per-task losses (``dice``, ``bce``) and, for alpha "auto", the learned weights
    (``weight_*``, ``log_var_*``) are means over the epoch's steps, as ``train_loss``.
    ``devices``/``processes``: where the epoch ran (for throughput figures).
    """
    parts = {k: v for k, v in train_metrics.items() if k not in ("loss", "lr")}
    return {"epoch": epoch + 1, "step": int(state.step), "lr": train_metrics["lr"],
            "train_loss": train_metrics["loss"], **parts, **val, "seconds": round(seconds, 3),
            "devices": jax.device_count(), "processes": jax.process_count()}


def format_duration(seconds: float) -> str:
    """``42 s``, ``7 min`` or ``3.4 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def time_left(epoch_seconds: list[float], epochs_left: int) -> float:
    """The fold's estimated seconds left: the mean epoch time times the epochs left.

    The first epoch of this process also compiles the steps, so it is left out of the mean
    once a later epoch has been timed.
    """
    timed = epoch_seconds[1:] or epoch_seconds
    return sum(timed) / max(len(timed), 1) * epochs_left


def log_epoch(fold: int, epochs: int, record: dict, n_examples: int, is_best: bool,
              seconds_left: float) -> None:
    """One line per epoch: losses, lr, inner-val metrics, time, throughput and time left."""
    fmt = fold_eval.format_metric
    log.info("fold %d epoch %d/%d: loss %.4f lr %.3g | val dsc %s auc %s score %.3f | "
             "%.1f s, %.1f ex/s%s | fold: ~%s left", fold, record["epoch"], epochs,
             record["train_loss"], record["lr"], fmt(record["val_dsc"]), fmt(record["val_auc"]),
             record["val_score"], record["seconds"], n_examples / max(record["seconds"], 1e-9),
             " (best)" if is_best else "", format_duration(seconds_left))


def train_and_evaluate(config: config_lib.Config, workdir: str | Path, fold: int,
                       resume: bool = False) -> dict:
    """Train fold ``fold`` (resuming from its latest checkpoint if ``resume``), then evaluate
    its best checkpoint on the held-out fold. Returns the eval dict (as ``eval.json``).

    Raises :class:`~mlssp_jax.errors.TrainingDiverged` on a NaN/inf loss (the last good
    checkpoint is kept).
    """
    workdir = Path(workdir)
    splits.check_fold(fold, config.train.num_folds)
    rundir.check_config(config, workdir)  # cheap checks first: before the cohort is made
    conv_ops.resolve_impl(config.model.conv_impl)  # an impl that cannot run here: fail now
    models.build_model(config.model)  # a model the config cannot build: fail before any file
    data = load_fold_data(config, workdir, fold)  # validates the data before writing anything
    mesh = parallel.make_mesh()
    steps = steps_per_epoch(config, len(data["train"]), fold)
    if parallel.is_main_process():
        rundir.write_config(config, workdir)
    state = create_train_state(config, jax.random.key(config.train.seed), mesh, steps)
    manager = checkpointing.open_manager(rundir.checkpoint_dir(workdir, fold))
    try:
        state, start = start_or_resume(manager, state, workdir, fold, resume)
        predict_fn = make_predict_fn(config, mesh)
        state = run_epochs(config, state, data, manager, workdir, fold, start, mesh, steps,
                           predict_fn)
        manager.wait_until_finished()
        best = manager.best_step()
        params, _ = checkpointing.restore_params(manager, best, eval_params(state))
    finally:
        manager.close()
    log.info("fold %d: evaluating the best checkpoint (epoch %d) on %d held-out subjects",
             fold, best, len(data["test"]))
    rule, val_rows = wholescan_eval.choose_postprocessing(
        config, predict_fn, params, data["val_volumes"], workdir, fold, mesh)
    cal = fit_calibration(config, predict_fn, params, data, val_rows, mesh)
    if parallel.is_main_process():
        cal.save(rundir.fold_dir(workdir, fold))
    descriptor_model = (descriptor_eval.fit_fold(config, data["training_subjects"], workdir, fold)
                        if descriptor_eval.applies(config) else None)
    whole = wholescan_eval.held_out(config, predict_fn, params, data["test_volumes"], rule, mesh,
                                    descriptor_model, cal)
    result = fold_eval.evaluate_fold(config, predict_fn, params, data["test"], workdir, fold,
                                     mesh, cal=cal, whole_scan=whole,
                                     seg_threshold=postprocess.threshold_of(
                                         rule, config.train.threshold))
    log.info("fold %d: %s | %s", fold, fold_eval.held_out_summary(result),
             wholescan_eval.summary(whole))
    return result


def fit_calibration(config: config_lib.Config, predict_fn: Callable, params: Any,
                    data: dict[str, list[dict]], val_rows: list[dict],
                    mesh: Mesh) -> calibration.Calibration:
    """``train.calibration`` fitted on the inner validation the run selects with: the
    whole-scan rows ``val_rows`` (the pipeline's own VOI) when there are, else the VOIs."""
    if val_rows:
        return fold_eval.fit_calibration(config, val_rows)
    return fold_eval.fit_fold_calibration(config, predict_fn, params, data["val"], mesh)


def run_epochs(config: config_lib.Config, state: TrainState, data: dict[str, list[dict]],
               manager: Any, workdir: Path, fold: int, start: int, mesh: Mesh, steps: int,
               predict_fn: Callable) -> TrainState:
    """Epochs ``start..train.epochs - 1``: train, score the inner validation, record, save."""
    train_step = make_train_step(config, mesh, steps,
                                 fold_class_weights(config, data["train"]))
    epochs, seconds = config.train.epochs, []
    for epoch in range(start, epochs):
        began = time.perf_counter()
        state, train_metrics = train_epoch(train_step, state, data["train"], config, epoch, mesh)
        if config.data.sampling == "whole_volume" and wholescan_eval.segments(
                config, data["val_volumes"]):
            val = wholescan_eval.score_inner_val(predict_fn, eval_params(state),
                                                 data["val_volumes"], config, mesh)
        else:
            val = fold_eval.score_inner_val(predict_fn, eval_params(state), data["val"], config,
                                            mesh)
        seconds.append(time.perf_counter() - began)
        record = epoch_record(epoch, state, train_metrics, val, seconds[-1])
        append_metrics(workdir, fold, record)
        checkpointing.save(manager, epoch + 1, state, {"record": record}, val[rundir.VAL_SCORE])
        log_epoch(fold, epochs, record, steps * config.train.batch_size,
                  manager.best_step() == epoch + 1, time_left(seconds, epochs - epoch - 1))
    return state
