"""Post-processing rules, their choice on validation, and their file in the run."""

import numpy as np
import pytest

from mlssp_jax import postprocess
from mlssp_jax.errors import InputError


def _two_blobs():
    mask = np.zeros((20, 20, 20), bool)
    mask[2:8, 2:8, 2:8] = True  # 216 voxels
    mask[14:16, 14:16, 14:16] = True  # 8 voxels
    return mask


def test_rules_keep_the_brain_and_the_components_asked_for():
    mask, brain = _two_blobs(), np.ones((20, 20, 20), bool)
    assert postprocess.apply(mask, brain, {"name": "none"}, 1e-3).sum() == 224
    assert postprocess.apply(mask, brain, {"name": "largest"}, 1e-3).sum() == 216
    # voxel 1 mm^3 = 0.001 mL: the small blob is 0.008 mL, the large 0.216 mL
    assert postprocess.apply(mask, brain, {"name": "min_ml", "min_ml": 0.01}, 1e-3).sum() == 216
    assert postprocess.apply(mask, brain, {"name": "min_ml", "min_ml": 0.3}, 1e-3).sum() == 0
    brain[:, :, 5:] = False  # outside the brain is never kept
    assert postprocess.apply(mask, brain, {"name": "none"}, 1e-3).sum() == 6 * 6 * 3
    assert not postprocess.apply(np.zeros_like(mask), brain, {"name": "largest"}, 1e-3).any()


def test_choice_takes_the_best_score_and_the_simplest_of_equals(tmp_path):
    rules = postprocess.candidates([2.0, 0.5])
    assert [r["name"] for r in rules] == ["none", "largest", "min_ml", "min_ml"]
    assert [r.get("min_ml") for r in rules[2:]] == [0.5, 2.0]
    best, scored = postprocess.choose(lambda r: 0.7 if r["name"] != "none" else 0.6, rules)
    assert best == {"name": "largest"} and len(scored) == 4
    postprocess.save(tmp_path / "fold_0", best, scored)
    postprocess.save(tmp_path / "fold_1", {"name": "none"}, scored)
    postprocess.save(tmp_path / "fold_2", {"name": "none"}, scored)
    assert postprocess.load(tmp_path / "fold_0") == best
    assert postprocess.load(tmp_path / "fold_9") == {"name": "none"}  # older runs: none
    assert postprocess.ensemble_rule(tmp_path, [0, 1, 2]) == ({"name": "none"}, [None] * 3)
    assert postprocess.ensemble_rule(tmp_path, [0, 1])[0] == best  # a tie: the lowest fold's
    (tmp_path / "fold_3").mkdir()
    (tmp_path / "fold_3" / postprocess.FILE_NAME).write_text("{")
    with pytest.raises(InputError, match="fold_3"):
        postprocess.load(tmp_path / "fold_3")


def test_thresholds_and_the_density_cap_are_part_of_the_rule(tmp_path):
    rules = postprocess.candidates([1.0], thresholds=[0.5, 0.7], max_hu=130.0)
    assert [(r["name"], r["threshold"]) for r in rules] == [
        ("none", 0.5), ("largest", 0.5), ("min_ml", 0.5),
        ("none", 0.7), ("largest", 0.7), ("min_ml", 0.7)]
    assert all(r["max_hu"] == 130.0 for r in rules)
    assert postprocess.threshold_of(rules[3], 0.5) == 0.7
    assert postprocess.threshold_of({"name": "none"}, 0.4) == 0.4  # older rules: the config's
    assert postprocess.describe(rules[5]) == "min_ml1.0@0.7"
    mask, brain = _two_blobs(), np.ones((20, 20, 20), bool)
    hu = np.full(mask.shape, 70.0, np.float16)
    hu[2:8, 2:8, 2:4] = 600.0  # bone left inside the brain mask, touching the large blob
    capped = postprocess.apply(mask, brain, {"name": "none", "max_hu": 130.0}, 1e-3, hu=hu)
    assert capped.sum() == 224 - 6 * 6 * 2 and not (capped & (hu > 130)).any()
    with pytest.raises(ValueError, match="HU"):
        postprocess.apply(mask, brain, {"name": "none", "max_hu": 130.0}, 1e-3)
    for fold, t in enumerate([0.4, 0.6, 0.7]):
        postprocess.save(tmp_path / f"fold_{fold}", {"name": "largest", "threshold": t}, [])
    assert postprocess.ensemble_rule(tmp_path, [0, 1, 2]) == ({"name": "largest"},
                                                              [0.4, 0.6, 0.7])


def test_the_chosen_threshold_is_the_one_of_best_validation_dsc():
    from types import SimpleNamespace

    from mlssp_jax import wholescan
    truth = np.zeros((16, 16, 16), np.uint8)
    truth[4:10, 4:10, 4:10] = 1
    prob = np.where(truth, 0.9, 0.0).astype(np.float32)
    prob[3:11, 3:11, 3:11] = np.maximum(prob[3:11, 3:11, 3:11], 0.55)  # a rim at 0.55
    volume = {"image": prob, "brain": np.ones_like(truth), "mask": truth, "spacing_mm": 2.0,
              "hu": np.full(truth.shape, 60.0, np.float16)}
    cfg = SimpleNamespace(postprocess_min_ml=(), postprocess_thresholds=(0.5, 0.6),
                          postprocess_max_hu=0.0, threshold=0.5)
    rule, scored = wholescan.choose_postprocessing([volume], [prob], cfg)
    assert rule == {"name": "none", "threshold": 0.6}
    assert wholescan.dsc(wholescan.postprocessed(volume, prob, rule, 0.5), truth) == 1.0
    assert max(s["score"] for s in scored if s["rule"]["threshold"] == 0.5) < 1.0
