"""The descriptor classifier in a fold's whole-scan pipeline (the session's tiny run,
conftest.py ``tiny_run``) and added post hoc to a run trained without it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import write_fake_run

from mlssp_jax import descriptor_classifier as clf
from mlssp_jax import descriptor_eval, evaluate, preprocess, rundir
from mlssp_jax.cli import run_command
from mlssp_jax.wholescan_eval import descriptor_block

BLOCK_KEYS = {"accuracy", "sensitivity", "specificity", "auc", "brier", "ece", "threshold",
              "per_subject"}


def _eval(workdir):
    return json.loads(rundir.eval_path(workdir, 0).read_text())


def test_every_fold_fits_and_applies_the_descriptor_classifier(tiny_run):
    record = _eval(tiny_run)
    block = record["whole_scan"][descriptor_eval.BLOCK]
    test_ids = json.loads((tiny_run / "splits.json").read_text())["folds"][0]["test"]
    assert set(block) == BLOCK_KEYS
    assert [r["subject_id"] for r in block["per_subject"]] == test_ids
    cnn = record["whole_scan"]["classification"]["per_subject"]
    assert [r["label"] for r in block["per_subject"]] == [r["label"] for r in cnn]
    assert all(0.0 <= r["prob"] <= 1.0 and isinstance(r["lesion_found"], bool)
               for r in block["per_subject"])
    model = clf.DescriptorClassifier.load(rundir.descriptor_classifier_path(tiny_run, 0))
    assert model.features == clf.DEFAULT_FEATURES and np.all(np.isfinite(model.coef))
    # fitted on the true masks of the training folds (training + inner validation), not the test
    cfg = rundir.read_config(tiny_run)
    split = json.loads((tiny_run / "splits.json").read_text())["folds"][0]
    paths = preprocess.cached_cohort(cfg.data.manifest, cfg.data, 1)
    labels = json.loads((tiny_run / "splits.json").read_text())["subjects"]
    rows = descriptor_eval.training_rows(
        [{"subject_id": s, "label": labels[s], "path": paths[s]}
         for s in split["train"] + split["val"]], cfg)
    refit = clf.fit(clf.design_matrix(rows), np.array([r["label"] for r in rows]),
                    cfg.descriptors.l2_penalty)
    np.testing.assert_allclose(model.coef, refit.coef)
    assert model.intercept == pytest.approx(refit.intercept)


def test_post_hoc_mode_adds_the_same_block_to_a_run_without_it(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    trained = _eval(tiny_run)
    record = _eval(run)
    del record["whole_scan"][descriptor_eval.BLOCK]
    rundir.write_eval(run, 0, record)
    rundir.descriptor_classifier_path(run, 0).unlink()
    assert evaluate.main(["--workdir", str(run), "--descriptors", "--bootstrap", "50"]) == 0
    again = _eval(run)
    added = again["whole_scan"].pop(descriptor_eval.BLOCK)
    expected = trained["whole_scan"].pop(descriptor_eval.BLOCK)
    assert again == trained  # nothing else touched
    assert [r["subject_id"] for r in added["per_subject"]] == [
        r["subject_id"] for r in expected["per_subject"]]
    np.testing.assert_allclose([r["prob"] for r in added["per_subject"]],
                               [r["prob"] for r in expected["per_subject"]], rtol=1e-6)
    assert (json.loads(rundir.descriptor_classifier_path(run, 0).read_text())
            == json.loads(rundir.descriptor_classifier_path(tiny_run, 0).read_text()))
    pooled = json.loads((run / "summary.json").read_text())["whole_scan"][descriptor_eval.BLOCK]
    assert len(pooled["per_subject"]) == len(added["per_subject"])
    assert {"auc", "brier", "ece"} <= set(pooled["ci95"])
    assert descriptor_eval.add_to_run(run) == []  # already there: nothing to do


def test_post_hoc_mode_writes_nothing_when_a_fold_fails(tiny_run, tmp_path, monkeypatch):
    """A failure while a fold is being evaluated leaves eval.json and the (missing)
    classifier file as they were: every fold is written at the end or none."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    record = _eval(run)
    del record["whole_scan"][descriptor_eval.BLOCK]
    rundir.write_eval(run, 0, record)
    rundir.descriptor_classifier_path(run, 0).unlink()
    before = rundir.eval_path(run, 0).read_bytes()

    def fail(*args, **kwargs):
        raise RuntimeError("the held-out prediction failed")

    monkeypatch.setattr(descriptor_eval.wholescan_eval, "held_out", fail)
    with pytest.raises(RuntimeError, match="held-out prediction failed"):
        descriptor_eval.add_to_run(run)
    assert rundir.eval_path(run, 0).read_bytes() == before
    assert not rundir.descriptor_classifier_path(run, 0).exists()


def test_post_hoc_mode_refuses_a_model_without_segmentation(tmp_path, capsys):
    write_fake_run(tmp_path / "cnn", model="cnn")
    assert run_command(evaluate.main, ["--workdir", str(tmp_path / "cnn"), "--descriptors"]) == 2
    assert "no segmentation branch" in capsys.readouterr().err
    assert not (tmp_path / "cnn" / "summary.json").exists()


def test_a_scan_without_a_predicted_lesion_gets_the_uninformed_answer():
    model = clf.fit(np.array([[0.0], [1.0], [2.0], [3.0]]), np.array([0, 0, 1, 1]), 1.0,
                    features=("hu_mean",))
    rows = [{"subject_id": "a", "label": 1, "descriptors": {"volume_ml": 2.0, "hu_mean": 3.0}},
            {"subject_id": "b", "label": 0, "descriptors": {"volume_ml": 0.0, "hu_mean": None}}]
    block = descriptor_block(model, rows, 0.5, 10)
    found, missed = block["per_subject"]
    assert found["lesion_found"] and not missed["lesion_found"]
    assert found["prob"] == pytest.approx(model.predict_proba(np.array([[3.0]]))[0])
    assert missed["prob"] == pytest.approx(1 / (1 + np.exp(-model.intercept)))
    assert clf.lesion_probabilities([model, model], [r["descriptors"] for r in rows]) == [
        pytest.approx(found["prob"]), None]
    assert clf.lesion_probabilities([], [rows[0]["descriptors"]]) == [None]
