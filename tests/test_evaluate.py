"""evaluate: pooling fake run directories (written per SPEC by the test) into summary.json."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mlssp_jax import config, evaluate, models

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
              "segmentation": seg, "classification": cls}
    (fold_dir / "eval.json").write_text(json.dumps(record))
    lines = [json.dumps({"epoch": e, "step": 5 * e, "lr": 1e-5, "train_loss": 1.0 / e,
                         "val_score": skill * (1 - 0.5 / e), "seconds": 1.0})
             for e in range(1, epochs + 1)]
    (fold_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_pools_segmentation_over_all_subjects(tmp_path):
    write_fake_run(tmp_path / "run")
    summary = evaluate.summarize(tmp_path / "run", n_resamples=200, seed=0)
    rows = [r for k in range(FOLDS) for r in json.loads(
        (tmp_path / "run" / f"fold_{k}" / "eval.json").read_text())["segmentation"]["per_subject"]]
    seg = summary["segmentation"]
    assert summary["n_subjects"] == SUBJECTS == len(seg["per_subject"])
    assert seg["dsc"] == pytest.approx(np.mean([r["dsc"] for r in rows]))
    ppvs = [r["ppv"] for r in rows if r["ppv"] is not None]
    assert seg["ppv"] == pytest.approx(np.mean(ppvs))  # undefined PPVs left out
    for key in ("dsc", "sensitivity", "specificity", "ppv"):
        low, high = seg["ci95"][key]
        assert low <= seg[key] <= high and low < high


def test_pools_classification_out_of_fold(tmp_path):
    truth = write_fake_run(tmp_path / "run", skill=0.6)
    cls = evaluate.summarize(tmp_path / "run", n_resamples=200, seed=0)["classification"]
    labels = np.array([truth[s][0] for s in sorted(truth)])
    probs = np.array([truth[s][1] for s in sorted(truth)])
    assert cls["accuracy"] == pytest.approx(np.mean((probs >= 0.5) == labels))
    assert cls["sensitivity"] == pytest.approx(np.mean(probs[labels == 1] >= 0.5))
    assert cls["auc"] == pytest.approx(roc_auc_score(labels, probs))
    low, high = cls["ci95"]["auc"]
    assert low <= cls["auc"] <= high < 1.0 + 1e-9


def test_bootstrap_is_seeded(tmp_path):
    write_fake_run(tmp_path / "run")
    a = evaluate.summarize(tmp_path / "run", n_resamples=100, seed=3)
    b = evaluate.summarize(tmp_path / "run", n_resamples=100, seed=3)
    c = evaluate.summarize(tmp_path / "run", n_resamples=100, seed=4)
    assert a == b
    assert a["segmentation"]["ci95"] != c["segmentation"]["ci95"]


def test_missing_folds_are_listed_and_logged(tmp_path, caplog):
    write_fake_run(tmp_path / "run")
    (tmp_path / "run" / "fold_2" / "eval.json").unlink()
    with caplog.at_level(logging.WARNING):
        summary = evaluate.summarize(tmp_path / "run", n_resamples=50)
    assert summary["missing_folds"] == [2] and summary["folds"] == [0, 1, 3]
    assert summary["n_subjects"] == SUBJECTS - SUBJECTS // FOLDS
    assert "folds [2]" in caplog.text


def test_single_task_model_has_a_null_task(tmp_path):
    write_fake_run(tmp_path / "cnn", model="cnn")
    summary = evaluate.summarize(tmp_path / "cnn", n_resamples=50)
    assert summary["segmentation"] is None and summary["model"] == "cnn"
    assert summary["classification"]["auc"] is not None


def test_command_writes_summary(tmp_path):
    write_fake_run(tmp_path / "run", alpha=0.3)
    assert evaluate.main(["--workdir", str(tmp_path / "run"), "--bootstrap", "50"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["alpha"] == 0.3 and summary["bootstrap"]["resamples"] == 50


def test_no_finished_fold_is_an_error(tmp_path, capsys):
    from mlssp_jax.cli import run_command

    write_fake_run(tmp_path / "run")
    for fold in range(FOLDS):
        (tmp_path / "run" / f"fold_{fold}" / "eval.json").unlink()
    assert run_command(evaluate.main, ["--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no finished fold" in err
    assert not (tmp_path / "run" / "summary.json").exists()
    assert run_command(evaluate.main, ["--workdir", str(tmp_path / "nothing")]) == 2
    assert "config.toml" in capsys.readouterr().err


def test_undefined_metrics_are_null(tmp_path):
    """A metric undefined for every subject (PPV with no predicted voxel) is null, no CI."""
    write_fake_run(tmp_path / "run")
    for fold in range(FOLDS):
        path = tmp_path / "run" / f"fold_{fold}" / "eval.json"
        record = json.loads(path.read_text())
        for row in record["segmentation"]["per_subject"]:
            row["ppv"] = None
        path.write_text(json.dumps(record))
    seg = evaluate.summarize(tmp_path / "run", n_resamples=50)["segmentation"]
    assert seg["ppv"] is None and seg["ci95"]["ppv"] == [None, None]
    assert seg["dsc"] is not None
