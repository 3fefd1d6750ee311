"""Scoring a fold's VOIs: eval.json's fields, the selection score, the thresholding rule."""

from __future__ import annotations

import numpy as np
import pytest

from mlssp_jax import calibration, fold_eval, rundir


def _pred(subject_id, label, truth, prob, cls_prob):
    return {"subject_id": subject_id, "label": label, "mask": truth, "seg_prob": prob,
            "cls_prob": cls_prob, "image": np.zeros_like(prob)}


def test_results_have_spec_fields_and_mean_per_subject_metrics():
    truth = np.zeros((4, 4, 4), bool)
    truth[1:3, 1:3, 1:3] = True  # 8 voxels
    half = np.where(truth, 0.9, 0.1)
    half[1, 1:3, 1:3] = 0.2  # 4 of 8 found, no false positives: dsc 2*4/(8+4) = 2/3
    preds = [_pred("a", 1, truth, np.where(truth, 0.9, 0.1), 0.8), _pred("b", 0, truth, half, 0.3)]
    seg = fold_eval.segmentation_result(preds, 0.5, spacing_mm=2.0)
    assert [s["subject_id"] for s in seg["per_subject"]] == ["a", "b"]
    assert seg["dsc"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert seg["sensitivity"] == pytest.approx(0.75)
    assert set(seg) == {*rundir.SEG_KEYS, "threshold", "per_subject"} and seg["threshold"] == 0.5
    assert fold_eval.segmentation_result(preds, 0.15, spacing_mm=2.0)["dsc"] == 1.0  # b found
    assert set(seg["per_subject"][0]) == {"subject_id", *rundir.SEG_KEYS}
    # b misses 4 voxels of 8 mm^3 each: 0.032 mL; a is exact
    assert seg["volume_error_ml"] == pytest.approx((0.0 + 4 * 8 / 1000) / 2)
    assert seg["per_subject"][0]["hd95_mm"] == 0.0 and seg["per_subject"][1]["hd95_mm"] > 0
    cls = fold_eval.classification_result(preds, 0.5)
    assert set(cls) == {"accuracy", "sensitivity", "specificity", "auc", "brier", "ece",
                        "threshold", "per_subject"}
    assert (cls["accuracy"], cls["auc"]) == (1.0, 1.0)
    # probabilities 0.8 (AVM) and 0.3 (other): Brier (0.2^2 + 0.3^2) / 2, ECE (0.2 + 0.3) / 2
    assert cls["brier"] == pytest.approx(0.065)
    assert cls["ece"] == pytest.approx(0.25)
    assert cls["per_subject"][1] == {"subject_id": "b", "label": 0, "prob": 0.3}


def test_selection_score_is_mean_of_dsc_and_auc_falling_back_to_accuracy():
    assert fold_eval.selection_score({"dsc": 0.6}, {"auc": 0.8, "accuracy": 0.5}) == 0.7
    assert fold_eval.selection_score({"dsc": 0.6}, {"auc": None, "accuracy": 0.5}) == 0.55
    assert fold_eval.selection_score(None, {"auc": 0.9, "accuracy": 0.5}) == 0.9
    assert fold_eval.selection_score({"dsc": 0.4}, None) == 0.4


def test_selection_score_on_segmentation_ignores_the_auc_unless_the_model_only_classifies():
    seg, cls = {"dsc": 0.6}, {"auc": 1.0, "accuracy": 0.5}
    assert fold_eval.selection_score(seg, cls, "segmentation") == 0.6
    assert fold_eval.selection_score(None, cls, "segmentation") == 1.0


def test_a_probability_at_the_threshold_is_positive_everywhere(tmp_path):
    """One rule, ``>= threshold``, for voxels, subjects and the saved predictions."""
    truth = np.zeros((4, 4, 4), bool)
    truth[1:3, 1:3, 1:3] = True
    at_threshold = np.where(truth, 0.5, 0.0).astype(np.float32)
    preds = [_pred("a", 1, truth, at_threshold, 0.5), _pred("b", 0, truth, at_threshold, 0.1)]
    assert fold_eval.segmentation_result(preds, 0.5, 1.0)["dsc"] == 1.0
    assert fold_eval.classification_result(preds, 0.5)["accuracy"] == 1.0
    fold_eval.save_predictions(tmp_path, preds, 0.5)
    with np.load(tmp_path / "a.npz") as saved:
        assert (saved["pred"] == truth).all()


def test_an_empty_prediction_has_null_hd95_left_out_of_the_mean():
    truth = np.zeros((4, 4, 4), bool)
    truth[1:3, 1:3, 1:3] = True
    preds = [_pred("a", 1, truth, np.where(truth, 0.9, 0.1), 0.8),
             _pred("b", 0, truth, np.zeros(truth.shape), 0.3)]
    seg = fold_eval.segmentation_result(preds, 0.5, 1.0)
    assert seg["per_subject"][1]["hd95_mm"] is None and seg["per_subject"][1]["dsc"] == 0.0
    assert seg["hd95_mm"] == 0.0 and seg["dsc"] == 0.5


def test_temperature_rescales_only_the_classification_probabilities():
    truth = np.ones((2, 2, 2), bool)
    preds = [_pred("a", 1, truth, np.full((2, 2, 2), 0.9), 0.8),
             _pred("b", 0, truth, np.full((2, 2, 2), 0.9), 0.3)]
    assert fold_eval.calibrated(preds, calibration.Calibration()) is preds
    halved = calibration.Calibration("temperature", slope=0.5)  # T = 2
    scaled = fold_eval.calibrated(preds, halved)  # logit / 2: towards 0.5, order kept
    assert 0.5 < scaled[0]["cls_prob"] < 0.8 and 0.3 < scaled[1]["cls_prob"] < 0.5
    assert scaled[0]["cls_prob"] == pytest.approx(1 / (1 + (0.2 / 0.8) ** 0.5))
    assert scaled[0]["seg_prob"] is preds[0]["seg_prob"]
