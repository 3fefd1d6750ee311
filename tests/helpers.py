"""Helpers shared by test modules: fake finished runs (as training leaves them) and the tiny
training runs' command line and environment (fixtures using them are in conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from mlssp_jax import config, models

ROOT = Path(__file__).resolve().parent.parent
# The tiny training config: a 2 mm grid (the tiny cohort's --small scans are 2-3 mm in-plane;
# normal-size heads at 1 mm take ~9 s each to preprocess), VOI 16^3, width 4, global batch 4,
# lr 1e-3, a moving average of the parameters (so the resume test covers its checkpoint),
# and the default
# conv_impl ("auto": on one CPU device oneDNN, on several the 2-D formulations, see
# conv_ops.resolve_impl).
TINY_CONFIG = """
[data]
spacing_mm = 2.0
voi_size = 16
[model]
width = 4
dense_units = 8
[train]
alpha = 0.4
learning_rate = 1e-3
batch_size = 4
epochs = 2
workers = 0
ema_decay = 0.9
"""


def train_env(devices: int = 1) -> dict[str, str]:
    """Environment of a training subprocess: this session's (CPU, compile and preprocessing
    caches, set by conftest.py) with ``devices`` host devices."""
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def train_command(config_path: Path, manifest: Path, workdir: Path, *extra: str) -> list[str]:
    """``python -m mlssp_jax.train`` on fold 0 of ``manifest``."""
    return [sys.executable, "-m", "mlssp_jax.train", "--config", str(config_path), "--data",
            str(manifest), "--workdir", str(workdir), "--fold", "0", *extra]


def run_train(env: dict, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    """Run a command (from the repo root); assert its exit code, show its stderr's end if not."""
    done = subprocess.run(list(args), env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == expect, done.stderr[-3000:]
    return done


SUBJECTS = 20
FOLDS = 4
VOI = 16


def _per_subject_seg(rng, subject_id, skill):
    dsc = float(np.clip(rng.normal(skill, 0.1), 0, 1))
    return {"subject_id": subject_id, "dsc": dsc, "sensitivity": float(np.clip(dsc + 0.05, 0, 1)),
            "specificity": float(1 - rng.uniform(0, 0.02)),
            "ppv": None if dsc < 0.05 else float(np.clip(dsc - 0.05, 0, 1))}


def _prediction(rng, skill):
    """A VOI with a ball lesion and a prediction shifted by (1 - skill) * 4 voxels."""
    grid = np.indices((VOI,) * 3) - VOI // 2
    truth = (grid**2).sum(axis=0) <= 16
    shift = int(round((1 - skill) * 4))
    pred = np.roll(truth, shift, axis=0)
    image = np.clip(0.35 + 0.35 * truth + rng.normal(0, 0.03, truth.shape), 0, 1)
    return {"image": image.astype(np.float32), "mask": truth.astype(np.uint8),
            "pred": pred.astype(np.uint8), "prob": pred.astype(np.float32)}


def _whole_scan(rng, ids, labels, skill, cls):
    """eval.json's whole_scan block: DSC a little under the VOI protocol's, some false
    positives, and the descriptor classifier (its own probabilities, of the same skill)."""
    rows = [{"subject_id": s, "dsc": float(np.clip(rng.normal(skill - 0.1, 0.1), 0, 1)),
             "hd95_mm": float(rng.uniform(2, 20)), "volume_error_ml": float(rng.uniform(0, 3)),
             "false_positive_ml": float(rng.uniform(0, 2)), "detected": bool(rng.random() < skill)}
            for s in ids]
    seg = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "subject_id"}
    descriptors = {"accuracy": 0.0, "sensitivity": 0.0, "specificity": 0.0, "auc": 0.0,
                   "threshold": 0.5, "per_subject": [
                       {"subject_id": s, "label": lab, "lesion_found": True,
                        "prob": float(np.clip(0.5 + (2 * lab - 1) * skill * 0.4
                                              + rng.normal(0, 0.25), 0, 1))}
                       for s, lab in zip(ids, labels, strict=True)]}
    return {"segmentation": {**seg, "per_subject": rows}, "classification": cls,
            "descriptor_classification": descriptors}


def write_fake_run(workdir, model="mlssp", alpha=0.4, skill=0.8, seed=0, epochs=3):
    """A finished run per SPEC: config.toml, fold_K/{eval.json,metrics.jsonl,predictions/}.

    ``skill`` in (0, 1) raises DSCs and separates the AVM probabilities; returns the labels and
    probabilities written, by subject id.
    """
    cfg = config.apply_overrides(config.Config(), [
        f'model.name="{model}"', f"train.alpha={alpha}", f"train.num_folds={FOLDS}"])
    rng = np.random.default_rng(seed)
    truth = {}
    for fold in range(FOLDS):
        truth.update(write_fake_fold(workdir, cfg, fold, skill, rng, epochs))
    return truth


def write_fake_fold(workdir, cfg, fold, skill, rng, epochs=3):
    """What training fold ``fold`` leaves (and config.toml); returns {id: (label, prob)}."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.toml").write_text(config.to_toml(cfg))
    ids = [f"sub{n:03d}" for n in range(fold, SUBJECTS, cfg.train.num_folds)]
    labels = [n % 2 for n in range(fold, SUBJECTS, cfg.train.num_folds)]
    probs = [float(np.clip(0.5 + (2 * lab - 1) * skill * 0.4 + rng.normal(0, 0.25), 0, 1))
             for lab in labels]
    _write_fold(workdir / f"fold_{fold}", rng, fold, cfg, ids, labels, probs, skill, epochs)
    return {s: (lab, p) for s, lab, p in zip(ids, labels, probs, strict=True)}


def _write_fold(fold_dir, rng, fold, cfg, ids, labels, probs, skill, epochs):
    has_seg, has_cls = models.has_tasks(cfg.model.name)
    (fold_dir / "predictions").mkdir(parents=True, exist_ok=True)
    seg = None
    if has_seg:
        rows = [_per_subject_seg(rng, s, skill) for s in ids]
        seg = {k: float(np.mean([r[k] for r in rows]))
               for k in ("dsc", "sensitivity", "specificity")}
        seg.update(ppv=0.0, per_subject=rows)
        for s in ids:
            np.savez(fold_dir / "predictions" / f"{s}.npz", **_prediction(rng, skill))
    cls = None
    if has_cls:
        cls = {"accuracy": 0.0, "sensitivity": 0.0, "specificity": 0.0, "auc": 0.0,
               "threshold": 0.5, "per_subject": [{"subject_id": s, "label": lab, "prob": p}
                                                 for s, lab, p in zip(ids, labels, probs,
                                                                      strict=True)]}
    record = {"fold": fold, "alpha": cfg.train.alpha, "model": cfg.model.name,
              "segmentation": seg, "classification": cls,
              "whole_scan": _whole_scan(rng, ids, labels, skill, cls) if has_seg else None}
    (fold_dir / "eval.json").write_text(json.dumps(record))
    lines = [json.dumps({"epoch": e, "step": 5 * e, "lr": 1e-5, "train_loss": 1.0 / e,
                         "val_score": skill * (1 - 0.5 / e), "seconds": 1.0})
             for e in range(1, epochs + 1)]
    (fold_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def rotation_about(axis: int, degrees: float) -> np.ndarray:
    """(3, 3) rotation by ``degrees`` about array axis ``axis`` (0, 1 or 2)."""
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    i, j = [a for a in range(3) if a != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot
