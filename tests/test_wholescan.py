"""Whole-scan evaluation with fake models: painting the brain scores badly, the truth perfectly."""

import numpy as np
import pytest

from mlssp_jax import wholescan
from mlssp_jax.config import Config, DataConfig, TrainConfig

S = 16


def _volume(spacing_mm=2.0):
    """A 24x28x20 volume: brain box, a 4^3 lesion; image 0.8 on the lesion, 0.3 in the brain."""
    brain = np.zeros((24, 28, 20), np.uint8)
    brain[3:21, 4:24, 2:18] = 1
    mask = np.zeros_like(brain)
    mask[8:12, 10:14, 6:10] = 1
    image = np.where(mask, 0.8, brain * 0.3).astype(np.float32)
    return {"subject_id": "s0", "label": np.float32(1), "image": image, "brain": brain,
            "mask": mask, "spacing_mm": spacing_mm}


def _fake(rule):
    """A predict_fn: seg_prob = rule(window), cls_prob = mean of the window."""
    def predict(images):
        return {"seg_prob": rule(images).astype(np.float32),
                "cls_prob": images.mean(axis=(1, 2, 3, 4))}
    return predict


def _cfg():
    return Config(data=DataConfig(voi_size=S, spacing_mm=2.0),
                  train=TrainConfig(batch_size=2, postprocess_min_ml=(1.0,)))


def test_a_model_painting_the_brain_scores_near_zero_with_a_large_false_positive_volume():
    volume = _volume()
    run = wholescan.run([volume], _fake(lambda x: (x > 0.1) * 1.0), _cfg(), 0.5,
                        rule={"name": "none"})
    row = run["segmentation"]["per_subject"][0]
    brain_ml, lesion_ml = volume["brain"].sum() * 0.008, volume["mask"].sum() * 0.008
    assert row["dsc"] < 0.1 and row["detected"]
    assert row["false_positive_ml"] > 0.5 * brain_ml
    assert row["volume_error_ml"] == pytest.approx(brain_ml - lesion_ml)
    assert row["hd95_mm"] > 10


def test_a_perfect_model_scores_one_and_no_false_positive():
    volume = _volume()
    run = wholescan.run([volume], _fake(lambda x: (x > 0.5) * 1.0), _cfg(), 0.5)
    seg = run["segmentation"]
    assert seg["dsc"] == 1.0 and seg["false_positive_ml"] == 0.0
    assert seg["volume_error_ml"] == 0.0 and seg["hd95_mm"] == 0.0 and seg["detected"] == 1.0
    assert run["rule"] == {"name": "none"}  # every rule ties at 1: the simplest
    assert run["classification_rows"][0]["cls_prob"] > 0  # the VOI on the found lesion
    missed = wholescan.run([volume], _fake(lambda x: x * 0.0), _cfg(), 0.5, {"name": "none"})
    row = missed["segmentation"]["per_subject"][0]
    assert row["dsc"] == 0.0 and not row["detected"] and row["hd95_mm"] is None


def test_false_positive_counts_only_voxels_beyond_ten_mm():
    truth = np.zeros((40, 10, 10), bool)
    truth[5, 5, 5] = True
    pred = np.zeros_like(truth)
    pred[5:30, 5, 5] = True  # distances 0..24 voxels of 1 mm
    assert wholescan.false_positive_ml(pred, truth, 1.0) == pytest.approx(14 / 1000)
    assert wholescan.false_positive_ml(pred, truth, 2.0) == pytest.approx(19 * 8 / 1000)  # 12-48 mm
    assert wholescan.false_positive_ml(pred, np.zeros_like(truth), 1.0) == pytest.approx(0.025)


def test_post_processing_is_chosen_on_validation_and_removes_a_distant_blob():
    volume = _volume()

    def lesion_and_blob(x):
        out = (x > 0.5) * 1.0
        out[:, 12:14, 12:14, 12:14] = 1.0  # a spurious 8-voxel blob wherever a window lies
        return out
    run = wholescan.run([volume], _fake(lesion_and_blob), _cfg(), 0.5)
    scores = {s["rule"]["name"]: s["score"] for s in run["scored"]}
    assert run["rule"]["name"] in ("largest", "min_ml") and scores["none"] < scores["largest"]
    assert run["segmentation"]["dsc"] == pytest.approx(scores["largest"])


def _with_native_mask(volume, tmp_path):
    """``volume`` (2 mm voxels, index i at 2i mm) and its lesion on a 1 mm scan grid (index j
    at j + 0.5 mm): the 2 mm lesion voxels 8..11 cover 15-23 mm, native voxels 15..22."""
    from mlssp_jax import nifti
    volume = {**volume, "affine": np.diag([2.0, 2.0, 2.0, 1.0])}
    native = np.zeros((48, 56, 40), np.uint8)
    native[15:23, 19:27, 11:19] = 1
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = 0.5
    path = tmp_path / "mask.nii.gz"
    nifti.save(path, native, affine)
    return {**volume, "native_mask_path": path}


def test_native_metrics_score_the_mask_on_the_scans_own_grid(tmp_path):
    volume = _with_native_mask(_volume(), tmp_path)

    def lesion_and_blob(x):
        out = (x > 0.5) * 1.0
        out[:, 12:14, 12:14, 12:14] = 1.0  # removed by the rule below, so not in the mask
        return out
    perfect = wholescan.run([volume], _fake(lesion_and_blob), _cfg(), 0.5,
                            rule={"name": "largest"})
    row = perfect["segmentation"]["per_subject"][0]
    # trilinear values at the cube's 8 corner voxels are 0.75^3 < 0.5: those alone are lost
    assert row["dsc_native"] == pytest.approx(2 * 504 / (504 + 512))
    assert row["volume_error_native_ml"] == pytest.approx(8 / 1000)
    assert row["volume_native_ml"] == pytest.approx(504 / 1000)  # 1 mm voxels
    assert row["true_volume_native_ml"] == pytest.approx(512 / 1000)
    painted = wholescan.run([volume], _fake(lambda x: (x > 0.1) * 1.0), _cfg(), 0.5,
                            rule={"name": "none"})
    row = painted["segmentation"]["per_subject"][0]
    assert row["dsc_native"] < 0.1 and row["volume_error_native_ml"] > 10 * 0.512
    no_native = wholescan.run([_volume()], _fake(lesion_and_blob), _cfg(), 0.5,
                              rule={"name": "largest"})
    seg = no_native["segmentation"]
    assert seg["per_subject"][0]["dsc_native"] is None and seg["dsc_native"] is None
    assert seg["per_subject"][0]["volume_native_ml"] is None
