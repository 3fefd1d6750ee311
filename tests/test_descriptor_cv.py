"""Cross-validation of the descriptor classifier over the training folds; reading descriptors
from a preprocessed file (with and without an ``hu`` field)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlssp_jax import config as config_lib
from mlssp_jax import descriptor_classifier as clf
from mlssp_jax import descriptor_cv, splits
from mlssp_jax.preprocess import window


def _rows(n: int = 40, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        rows.append({"subject_id": f"s{i:02d}", "label": label,
                     "rim_hu_mean": 30.0 + 8.0 * label + rng.normal(0, 3),  # informative
                     "hu_mean": 60.0 + rng.normal(0, 3), "log_volume_ml": None})
    return rows


def test_cross_validate_pools_the_training_folds():
    config = config_lib.Config(train=config_lib.TrainConfig(num_folds=4, seed=3))
    features = ("rim_hu_mean", "hu_mean", "log_volume_ml")
    rows = _rows()
    result = descriptor_cv.cross_validate(rows, config, features)
    assert result["auc"] > 0.9
    assert result["auc_ci95"][0] <= result["auc"] <= result["auc_ci95"][1]
    assert 0 <= result["brier"] < 0.25 and 0 <= result["ece"] <= 1
    assert abs(result["coefficients"]["rim_hu_mean"]) > abs(result["coefficients"]["hu_mean"])
    assert result["coefficients"]["log_volume_ml"] == 0.0  # never measured: no weight
    assert [r["subject_id"] for r in result["per_subject"]] == [r["subject_id"] for r in rows]
    full = clf.DescriptorClassifier.from_dict(result["model"])
    assert full.features == features and full.coef[0] == result["coefficients"]["rim_hu_mean"]
    # the folds are training's (splits.make_folds): fold 0 predicted by a fit on the others
    folds = splits.make_folds([r["subject_id"] for r in rows], [r["label"] for r in rows], 4, 3)
    test = [i for i, r in enumerate(rows) if r["subject_id"] in folds[0]]
    train = [i for i in range(len(rows)) if i not in test]
    x, y = clf.design_matrix(rows, features), np.array([r["label"] for r in rows])
    model = clf.fit(x[train], y[train], config.descriptors.l2_penalty, features)
    np.testing.assert_allclose([result["per_subject"][i]["prob"] for i in test],
                               model.predict_proba(x[test]))


@pytest.mark.parametrize("with_hu", [False, True])
def test_scan_descriptors_reads_a_preprocessed_file(tmp_path, with_hu):
    grid = np.indices((24, 24, 24)).transpose(1, 2, 3, 0)
    distance = np.linalg.norm(grid - 12, axis=-1)
    mask, brain = distance <= 3, distance <= 11
    hu = np.where(mask, 120.0, 35.0)  # 120 HU: outside the 0-100 HU window
    arrays = {"image": window(hu, 50.0, 100.0) * brain, "brain": brain.astype(np.uint8),
              "mask": mask.astype(np.uint8)}
    if with_hu:
        arrays["hu"] = hu.astype(np.float32)
    np.savez(tmp_path / "s.npz", **arrays)
    d = descriptor_cv.scan_descriptors(tmp_path / "s.npz", config_lib.Config())
    assert d["volume_ml"] == pytest.approx(mask.sum() / 1000)
    assert d["hu_mean"] == pytest.approx(120.0 if with_hu else 100.0)  # the window clips
    assert d["rim_hu_mean"] == pytest.approx(35.0)


def test_command_needs_an_output_folder(capsys):
    with pytest.raises(SystemExit) as exit_info:
        descriptor_cv.main([])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_command_on_a_tiny_cohort(tiny_config, tiny_cohort, tmp_path):
    """The whole command on a manifest: every subject described, out-of-fold probabilities for
    each, and a saved model that loads and reproduces the coefficients it reports."""
    out = tmp_path / "cv"
    assert descriptor_cv.main(["--config", str(tiny_config), "--data", str(tiny_cohort),
                               "--out", str(out), "--set", "train.num_folds=2"]) == 0
    rows = json.loads((out / "descriptors.json").read_text())
    result = json.loads((out / "descriptor_cv.json").read_text())
    assert len(rows) == 10 and all(r["volume_ml"] > 0 for r in rows)
    assert len(result["per_subject"]) == 10
    assert all(0.0 < r["prob"] < 1.0 for r in result["per_subject"])
    assert 0.0 <= result["auc"] <= 1.0 and result["num_folds"] == 2
    model = clf.DescriptorClassifier.load(out / "descriptor_classifier.json")
    assert model.coef.tolist() == pytest.approx(list(result["coefficients"].values()))
