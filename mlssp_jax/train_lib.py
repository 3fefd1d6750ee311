"""Training of one cross-validation fold: state, step functions, epoch loop, evaluation.

Arrays are channels-last: images and masks ``(B, S, S, S, 1)``, labels ``(B,)``. One jitted
train step runs data-parallel over every device of every host (:mod:`mlssp_jax.parallel`).
The learning rate is Adam's, decayed by ``train.lr_decay_per_epoch`` after every epoch.

Model selection: after every epoch the model predicts the inner-validation subjects (their
VOIs for ``data.sampling = "lesion"``, their whole scans for ``"whole_volume"``) and its
:func:`selection_score` (mean over the model's tasks of DSC and AUC) picks the best
checkpoint. At the end the post-processing is chosen on the inner-validation whole scans
(:mod:`mlssp_jax.postprocess`) and the best checkpoint is evaluated on the held-out fold
by both protocols (the paper's VOI and the whole scan, :mod:`mlssp_jax.wholescan`).
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh
from tqdm import tqdm

from mlssp_jax import (
    checkpointing,
    conv_ops,
    input_pipeline,
    losses,
    manifest,
    metrics,
    models,
    parallel,
    patches,
    postprocess,
    preprocess,
    splits,
    wholescan,
)
from mlssp_jax import config as config_lib
from mlssp_jax.errors import InputError
from mlssp_jax.fileio import atomic_path, write_json, write_text

log = logging.getLogger(__name__)
PredictFn = Callable[[Any, jax.Array], dict]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


@struct.dataclass
class TrainState:
    """Everything that changes during training (all replicated over the mesh)."""

    step: jax.Array  # () int32, optimiser steps taken
    params: Any  # the model's flax "params" collection
    log_vars: jax.Array  # (2,) learned log-variances (seg, cls) when alpha is "auto", else unused
    opt_state: optax.OptState


def create_learning_rate_fn(train_cfg: config_lib.TrainConfig,
                            steps_per_epoch: int) -> optax.Schedule:
    """lr(step) = learning_rate * (1 - lr_decay_per_epoch) ** (step // steps_per_epoch)."""
    return optax.exponential_decay(
        init_value=train_cfg.learning_rate, transition_steps=steps_per_epoch,
        decay_rate=1.0 - train_cfg.lr_decay_per_epoch, staircase=True)


def create_optimizer(train_cfg: config_lib.TrainConfig,
                     steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam (b1, b2 from the config) on the per-epoch decayed learning rate."""
    return optax.adam(create_learning_rate_fn(train_cfg, steps_per_epoch),
                      b1=train_cfg.adam_b1, b2=train_cfg.adam_b2)


def _trainable(state: TrainState) -> dict:
    return {"params": state.params, "log_vars": state.log_vars}


def abstract_params(config: config_lib.Config) -> Any:
    """Shapes and dtypes (on one device) of the model's parameters, without computing them."""
    model = models.build_model(config.model)
    size = config.data.voi_size
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, size, 1)))["params"])
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)


def create_train_state(config: config_lib.Config, rng: jax.Array, mesh: Mesh,
                       steps_per_epoch: int = 1) -> TrainState:
    """He-initialised parameters, zero log-variances and a fresh Adam state, replicated on ``mesh``.

    Every host computes the same values from ``rng``; ``steps_per_epoch`` only sets the
    learning-rate schedule, which does not change the state's structure.
    """
    model = models.build_model(config.model)
    tx = create_optimizer(config.train, steps_per_epoch)
    size = config.data.voi_size

    def init(params: dict) -> TrainState:
        log_vars = jnp.zeros((2,), jnp.float32)
        opt_state = tx.init({"params": params, "log_vars": log_vars})
        return TrainState(jnp.zeros((), jnp.int32), params, log_vars, opt_state)

    # Host-side init (models.init_params): XLA's RNG compile took minutes on CPU.
    seed = zlib.crc32(np.asarray(jax.random.key_data(rng)).tobytes())
    params = models.init_params(model, size, seed)
    return jax.jit(init, out_shardings=parallel.replicated(mesh))(params)


def make_loss_fn(config: config_lib.Config) -> Callable:
    """``(trainable, batch) -> (loss, parts)``: the weighted task losses on one batch."""
    model = models.build_model(config.model)
    alpha = config.train.alpha

    def loss_fn(trainable: dict, batch: dict) -> tuple[jax.Array, dict]:
        outputs = model.apply({"params": trainable["params"]}, batch["image"])
        log_vars = trainable["log_vars"] if alpha == "auto" else None
        return losses.total_loss(outputs, batch, alpha, log_vars, config.train.seg_bce_weight,
                                 config.train.batch_dice)

    return loss_fn


def make_train_step(config: config_lib.Config, mesh: Mesh, steps_per_epoch: int = 1) -> Callable:
    """A jitted ``(state, batch) -> (state, metrics)``; the state's buffers are donated.

    ``batch``: ``image``/``mask`` ``(B, S, S, S, 1)`` and ``label`` ``(B,)``, sharded along
    the batch. ``metrics``: ``loss``, the per-task losses and ``lr`` (the rate of this step).
    """
    loss_fn = make_loss_fn(config)
    tx = create_optimizer(config.train, steps_per_epoch)
    lr_fn = create_learning_rate_fn(config.train, steps_per_epoch)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        trainable = _trainable(state)
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, batch)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        new_state = state.replace(step=state.step + 1, params=trainable["params"],
                                  log_vars=trainable["log_vars"], opt_state=opt_state)
        return new_state, {**parts, "loss": loss, "lr": lr_fn(state.step)}

    return jax.jit(train_step, donate_argnums=0,
                   in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                   out_shardings=parallel.replicated(mesh))


def make_predict_fn(config: config_lib.Config, mesh: Mesh | None = None) -> PredictFn:
    """A jitted ``(params, images (B, S, S, S, 1)) -> {"seg_prob": (B, S, S, S, 1) | None,
    "cls_prob": (B,) | None}`` (sigmoid probabilities; None for a task the model lacks).

    With a ``mesh`` the images are sharded along the batch and the outputs replicated, so
    every host can read them.
    """
    model = models.build_model(config.model)

    def predict(params: Any, images: jax.Array) -> dict:
        out = model.apply({"params": params}, images)
        return {"seg_prob": None if out["seg"] is None else jax.nn.sigmoid(out["seg"]),
                "cls_prob": None if out["cls"] is None else jax.nn.sigmoid(out["cls"])}

    if mesh is None:
        return jax.jit(predict)
    return jax.jit(predict, in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                   out_shardings=parallel.replicated(mesh))


def _host_rows(batch: dict, key: str) -> np.ndarray:
    """This process's share of the rows of ``batch[key]`` (every host sees the whole batch)."""
    rows = len(batch[key]) // jax.process_count()
    start = jax.process_index() * rows
    return np.asarray(batch[key][start:start + rows])


def predict_examples(predict_fn: PredictFn, params: Any, examples: list[dict], batch_size: int,
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


SEG_KEYS = ("dsc", "sensitivity", "specificity", "ppv")
CLS_KEYS = ("accuracy", "sensitivity", "specificity", "auc")


def segmentation_result(preds: list[dict], threshold: float) -> dict | None:
    """eval.json's ``segmentation``: per-subject metrics of ``seg_prob > threshold``, means."""
    if not preds or preds[0]["seg_prob"] is None:
        return None
    per_subject = []
    for p in preds:
        m = metrics.segmentation_metrics(p["seg_prob"] > threshold, p["mask"])
        per_subject.append({"subject_id": p["subject_id"],
                            **{k: _finite_or_none(m[k]) for k in SEG_KEYS}})
    means = {k: _mean(s[k] for s in per_subject) for k in SEG_KEYS}
    return {**means, "per_subject": per_subject}


def classification_result(preds: list[dict], threshold: float) -> dict | None:
    """eval.json's ``classification``: accuracy, sensitivity, specificity, AUC at ``threshold``."""
    if not preds or preds[0]["cls_prob"] is None:
        return None
    labels = np.array([p["label"] for p in preds])
    probs = np.array([p["cls_prob"] for p in preds])
    m = metrics.classification_metrics(labels, probs, threshold=threshold)
    return {**{k: _finite_or_none(m[k]) for k in CLS_KEYS}, "threshold": threshold,
            "per_subject": [{"subject_id": p["subject_id"], "label": p["label"],
                             "prob": p["cls_prob"]} for p in preds]}


def selection_score(seg: dict | None, cls: dict | None) -> float:
    """The inner-validation score that picks the best checkpoint (higher is better).

    The mean over the model's tasks of the mean DSC (segmentation) and the AUC
    (classification; the accuracy when the AUC is undefined, i.e. one class only).
    """
    parts = []
    if seg is not None:
        parts.append(seg["dsc"] if seg["dsc"] is not None else 0.0)
    if cls is not None:
        parts.append(cls["auc"] if cls["auc"] is not None else cls["accuracy"] or 0.0)
    return float(np.mean(parts))


def numpy_predict_fn(predict_fn: PredictFn, params: Any, mesh: Mesh) -> Callable:
    """``images (B, S, S, S, 1) -> {"seg_prob", "cls_prob"}`` as numpy (None: no such task),
    ``params`` bound, for :mod:`mlssp_jax.inference`'s sliding windows."""
    def predict(images: np.ndarray) -> dict:
        sharded = parallel.shard_batch({"image": _host_rows({"image": images}, "image")}, mesh)
        out = jax.device_get(predict_fn(params, sharded["image"]))
        return {k: None if v is None else np.asarray(v) for k, v in out.items()}
    return predict


def _segments_whole_scans(config: config_lib.Config, volumes: list[dict] | None) -> bool:
    return bool(volumes) and models.has_tasks(config.model.name)[0]


def whole_scan_validate(predict_fn: PredictFn, params: Any, volumes: list[dict],
                        config: config_lib.Config, mesh: Mesh) -> dict:
    """Inner validation on whole scans (sliding windows with ``train.val_overlap``, the best
    post-processing rule): ``val_dsc``, ``val_false_positive_ml``, ``val_postprocessing``,
    ``val_auc``, ``val_accuracy`` and ``val_score``."""
    run = wholescan.run(volumes, numpy_predict_fn(predict_fn, params, mesh), config,
                        config.train.val_overlap)
    seg = run["segmentation"]
    cls = classification_result(run["classification_rows"], config.train.threshold)
    return {"val_dsc": seg["dsc"], "val_false_positive_ml": seg["false_positive_ml"],
            "val_postprocessing": run["rule"], "val_auc": cls and cls["auc"],
            "val_accuracy": cls and cls["accuracy"], "val_score": selection_score(seg, cls)}


def validate(predict_fn: PredictFn, params: Any, examples: list[dict], config: config_lib.Config,
             mesh: Mesh, volumes: list[dict] | None = None) -> dict:
    """Inner-validation ``val_dsc``, ``val_auc``, ``val_accuracy`` (None: no such task) and
    ``val_score`` (:func:`selection_score`): on the whole scans ``volumes`` for
    ``data.sampling = "whole_volume"`` (:func:`whole_scan_validate`), else on the VOIs."""
    if config.data.sampling == "whole_volume" and _segments_whole_scans(config, volumes):
        return whole_scan_validate(predict_fn, params, volumes, config, mesh)
    preds = predict_examples(predict_fn, params, examples, config.train.batch_size, mesh)
    seg = segmentation_result(preds, config.train.threshold)
    cls = classification_result(preds, config.train.threshold)
    return {"val_dsc": seg and seg["dsc"], "val_auc": cls and cls["auc"],
            "val_accuracy": cls and cls["accuracy"], "val_score": selection_score(seg, cls)}


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


def load_fold_data(config: config_lib.Config, workdir: Path, fold: int) -> dict[str, list[dict]]:
    """The fold's ``train``/``val``/``test`` VOI examples (split saved in ``W/splits.json``) and
    ``val_volumes``/``test_volumes`` (:func:`patches.load_volumes`, for the whole-scan
    protocol); ``train`` holds whole volumes too for ``data.sampling = "whole_volume"``."""
    manifest_path = manifest.resolve_data(config.data)
    subjects = manifest.read_manifest(manifest_path, require_masks=True)
    manifest.check_folds(subjects, config.train.num_folds, where=str(manifest_path))
    # train.workers = 0 preprocesses in this process, as the loader does (cached_cohort would
    # read 0 as one process per CPU)
    paths = preprocess.cached_cohort(manifest_path, config.data, max(config.train.workers, 1))
    ids = [s.subject_id for s in subjects]
    labels = [s.label for s in subjects]
    t = config.train
    if not 0 <= fold < t.num_folds:
        raise InputError(f"--fold: must be in 0..{t.num_folds - 1}, got {fold}")
    split = splits.load_or_create(workdir, ids, labels, t.num_folds, t.inner_val_fraction,
                                  t.seed)[fold]
    label_of = dict(zip(ids, labels, strict=True))
    margins = {"train": config.augment.voi_jitter_mm, "val": 0, "test": 0}
    background = config.augment.background_fraction > 0  # whole training volumes needed
    whole = config.data.sampling == "whole_volume"
    data = {part: input_pipeline.load_examples(paths, ids_, label_of, config.data.voi_size,
                                               margin=margins[part],
                                               whole_volumes=background and part == "train")
            for part, ids_ in split.items() if not (whole and part == "train")}
    if whole:
        data["train"] = patches.load_volumes(paths, split["train"], label_of)
    data["val_volumes"] = patches.load_volumes(paths, split["val"], label_of)
    data["test_volumes"] = patches.load_volumes(paths, split["test"], label_of)
    return data


def write_run_config(config: config_lib.Config, workdir: Path) -> None:
    """Write ``W/config.toml``; refuse a workdir that already holds another config."""
    path = workdir / "config.toml"
    if path.exists() and config_lib.load(path) != config:
        raise InputError(f"{path}: this workdir was made with another config; use a new "
                         "--workdir or the same options")
    if parallel.is_main_process():
        write_text(path, config_lib.to_toml(config))


def start_or_resume(manager: Any, state: TrainState, fold_dir: Path,
                    resume: bool) -> tuple[TrainState, int]:
    """Restore the latest checkpoint (``resume``) or start fresh; returns (state, finished epochs).

    ``metrics.jsonl`` is rewritten to hold exactly the epochs of the restored checkpoint.
    """
    latest = manager.latest_step()
    records: list[dict] = []
    if latest is not None:
        if not resume:
            raise InputError(f"{fold_dir}: already has checkpoints; pass --resume to continue "
                             "or use a new --workdir")
        state, meta = checkpointing.restore(manager, latest, state)
        records = [r for r in read_metrics(fold_dir) if r["epoch"] < latest] + [meta["record"]]
        log.info("resuming %s after epoch %d (step %d)", fold_dir, latest, int(state.step))
    if parallel.is_main_process():
        write_text(fold_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return state, latest or 0


def read_metrics(fold_dir: Path) -> list[dict]:
    """The records of ``fold_dir/metrics.jsonl`` (empty if absent)."""
    path = fold_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_metrics(fold_dir: Path, record: dict) -> None:
    """Add one epoch's record to ``metrics.jsonl`` (rewritten atomically)."""
    if parallel.is_main_process():
        lines = [json.dumps(r) for r in read_metrics(fold_dir)] + [json.dumps(record)]
        write_text(fold_dir / "metrics.jsonl", "\n".join(lines) + "\n")


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


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def log_epoch(fold: int, epochs: int, record: dict, n_examples: int, is_best: bool) -> None:
    """One line per epoch: losses, lr, inner-val metrics, time and throughput."""
    log.info("fold %d epoch %d/%d: loss %.4f lr %.3g | val dsc %s auc %s score %.3f | "
             "%.1f s, %.1f ex/s%s", fold, record["epoch"], epochs, record["train_loss"],
             record["lr"], _fmt(record["val_dsc"]), _fmt(record["val_auc"]), record["val_score"],
             record["seconds"], n_examples / max(record["seconds"], 1e-9),
             " (best)" if is_best else "")


def save_predictions(out_dir: Path, preds: list[dict], threshold: float) -> None:
    """``<subject_id>.npz`` per subject: VOI ``image`` (S, S, S) float32, ``mask`` uint8 truth,
    ``pred`` uint8 and ``prob`` float16 (if the model segments), ``label``, ``cls_prob``
    (NaN if the model does not classify)."""
    for p in preds:
        arrays = {"image": p["image"].astype(np.float32), "mask": p["mask"].astype(np.uint8),
                  "label": np.int8(p["label"]),
                  "cls_prob": np.float32(np.nan if p["cls_prob"] is None else p["cls_prob"])}
        if p["seg_prob"] is not None:
            arrays["pred"] = (p["seg_prob"] > threshold).astype(np.uint8)
            arrays["prob"] = p["seg_prob"].astype(np.float16)
        with atomic_path(out_dir / f"{p['subject_id']}.npz") as tmp:
            np.savez_compressed(tmp, **arrays)


def choose_postprocessing(config: config_lib.Config, predict_fn: PredictFn, params: Any,
                          volumes: list[dict], fold_dir: Path, mesh: Mesh) -> dict:
    """The post-processing rule of best whole-scan DSC on the inner-validation ``volumes``
    (``none`` without them or a segmentation), saved as ``fold_dir/postprocessing.json``."""
    if not _segments_whole_scans(config, volumes):
        return dict(postprocess.NONE)
    run = wholescan.run(volumes, numpy_predict_fn(predict_fn, params, mesh), config,
                        wholescan.EVAL_OVERLAP)
    if parallel.is_main_process():
        postprocess.save(fold_dir, run["rule"], run["scored"])
    log.info("post-processing chosen on %d inner-validation scans: %s (%s)", len(volumes),
             run["rule"], ", ".join(f"{s['rule']['name']}{s['rule'].get('min_ml', '')}: "
                                    f"{s['score']:.3f}" for s in run["scored"]))
    return run["rule"]


def whole_scan_result(config: config_lib.Config, predict_fn: PredictFn, params: Any,
                      volumes: list[dict] | None, rule: dict, mesh: Mesh) -> dict | None:
    """eval.json's ``whole_scan`` block (SPEC.md) on ``volumes`` with post-processing ``rule``;
    None for a model without segmentation."""
    if not _segments_whole_scans(config, volumes):
        return None
    run = wholescan.run(volumes, numpy_predict_fn(predict_fn, params, mesh), config,
                        wholescan.EVAL_OVERLAP, rule)
    return {"segmentation": run["segmentation"],
            "classification": classification_result(run["classification_rows"],
                                                    config.train.threshold)}


def evaluate_fold(config: config_lib.Config, predict_fn: PredictFn, params: Any,
                  examples: list[dict], fold: int, fold_dir: Path, mesh: Mesh,
                  volumes: list[dict] | None = None, rule: dict | None = None) -> dict:
    """Predict the held-out VOIs and whole scans ``volumes`` (post-processing ``rule``) with
    ``predict_fn`` (the one compiled for validation, from :func:`make_predict_fn`); write
    ``eval.json`` (SPEC.md) and ``predictions/``."""
    preds = predict_examples(predict_fn, params, examples, config.train.batch_size, mesh)
    threshold = config.train.threshold
    result = {"fold": fold, "alpha": config.train.alpha, "model": config.model.name,
              "segmentation": segmentation_result(preds, threshold),
              "classification": classification_result(preds, threshold),
              "whole_scan": whole_scan_result(config, predict_fn, params, volumes,
                                              rule or dict(postprocess.NONE), mesh)}
    if parallel.is_main_process():
        save_predictions(fold_dir / "predictions", preds, threshold)
        write_json(fold_dir / "eval.json", result)
    return result


def _summary(result: dict) -> str:
    seg, cls = result["segmentation"], result["classification"]
    whole = result.get("whole_scan") or {}
    wseg, wcls = whole.get("segmentation"), whole.get("classification")
    return (f"held-out VOI DSC {_fmt(seg and seg['dsc'])}, AUC {_fmt(cls and cls['auc'])}, "
            f"accuracy {_fmt(cls and cls['accuracy'])} | whole scan DSC "
            f"{_fmt(wseg and wseg['dsc'])}, false positive "
            f"{_fmt(wseg and wseg['false_positive_ml'])} mL, AUC {_fmt(wcls and wcls['auc'])}")


def train_and_evaluate(config: config_lib.Config, workdir: str | Path, fold: int,
                       resume: bool = False) -> dict:
    """Train fold ``fold`` (resuming from its latest checkpoint if ``resume``), then evaluate
    its best checkpoint on the held-out fold. Returns the eval dict (as ``eval.json``).

    Raises :class:`TrainingDiverged` on a NaN/inf loss (the last good checkpoint is kept).
    """
    workdir = Path(workdir)
    fold_dir = workdir / f"fold_{fold}"
    conv_ops.resolve_impl(config.model.conv_impl)  # an impl that cannot run here: fail now
    data = load_fold_data(config, workdir, fold)  # validates the data before writing anything
    write_run_config(config, workdir)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.train.batch_size, mesh)
    steps = input_pipeline.steps_per_epoch(
        len(data["train"]) * config.train.patches_per_subject, config.train.batch_size)
    if steps < 1:
        raise InputError(f"train.batch_size: {config.train.batch_size} is more than the "
                         f"{len(data['train'])} training subjects of fold {fold}")
    state = create_train_state(config, jax.random.key(config.train.seed), mesh, steps)
    manager = checkpointing.open_manager(checkpointing.checkpoint_dir(workdir, fold))
    try:
        state, start = start_or_resume(manager, state, fold_dir, resume)
        train_step, predict_fn = make_train_step(config, mesh, steps), make_predict_fn(config, mesh)
        for epoch in range(start, config.train.epochs):
            began = time.perf_counter()
            state, train_metrics = train_epoch(train_step, state, data["train"], config, epoch,
                                               mesh)
            val = validate(predict_fn, state.params, data["val"], config, mesh,
                           data["val_volumes"])
            record = epoch_record(epoch, state, train_metrics, val, time.perf_counter() - began)
            append_metrics(fold_dir, record)
            checkpointing.save(manager, epoch + 1, state, {"record": record}, val["val_score"])
            log_epoch(fold, config.train.epochs, record, steps * config.train.batch_size,
                      manager.best_step() == epoch + 1)
        manager.wait_until_finished()
        best = manager.best_step()
        params, meta = checkpointing.restore_params(manager, best, state.params)
    finally:
        manager.close()
    log.info("fold %d: evaluating the best checkpoint (epoch %d) on %d held-out subjects",
             fold, best, len(data["test"]))
    rule = choose_postprocessing(config, predict_fn, params, data["val_volumes"], fold_dir, mesh)
    result = evaluate_fold(config, predict_fn, params, data["test"], fold, fold_dir, mesh,
                           data["test_volumes"], rule)
    log.info("fold %d: %s", fold, _summary(result))
    return result
