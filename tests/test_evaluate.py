"""evaluate: pooling fake run directories (written per SPEC by the test) into summary.json."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from helpers import FOLDS, SUBJECTS, write_fake_run
from sklearn.metrics import roc_auc_score

from mlssp_jax import evaluate


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


def test_pools_the_whole_scan_protocol_with_medians(tmp_path):
    write_fake_run(tmp_path / "run")
    summary = evaluate.summarize(tmp_path / "run", n_resamples=200, seed=0)
    rows = [r for k in range(FOLDS) for r in json.loads(
        (tmp_path / "run" / f"fold_{k}" / "eval.json").read_text())["whole_scan"]["segmentation"]
        ["per_subject"]]
    seg = summary["whole_scan"]["segmentation"]
    assert len(seg["per_subject"]) == SUBJECTS
    assert seg["dsc"] == pytest.approx(np.mean([r["dsc"] for r in rows]))
    assert seg["detected"] == pytest.approx(np.mean([r["detected"] for r in rows]))
    assert seg["median_false_positive_ml"] == pytest.approx(
        np.median([r["false_positive_ml"] for r in rows]))
    assert seg["median_volume_error_ml"] == pytest.approx(
        np.median([r["volume_error_ml"] for r in rows]))
    assert summary["whole_scan"]["classification"]["auc"] == summary["classification"]["auc"]


def test_median_signed_volume_error_shows_the_bias_direction():
    rows = [{"volume_native_ml": p, "true_volume_native_ml": t}
            for p, t in ((9.0, 10.0), (4.0, 6.5), (21.0, 20.0))]
    # absolute errors 1, 2.5, 1 hide that two of three masks come out small
    assert evaluate.median_signed_error(rows) == pytest.approx(-1.0)
    older = [{"volume_error_native_ml": 1.0}, {"volume_native_ml": None,
                                              "true_volume_native_ml": 2.0}]
    assert evaluate.median_signed_error(older) is None
