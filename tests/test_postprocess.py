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
    scored = [{"rule": r, "score": 0.7 if r["name"] != "none" else 0.6} for r in rules]
    best = postprocess.choose_scored(scored, "dsc")
    assert best == {"name": "largest"}
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


def _cube_with_a_rim():
    """A 6^3 lesion at probability 0.9 inside a one-voxel rim at 0.55, 2 mm voxels: the
    (volume, prob, truth) of one validation scan."""
    truth = np.zeros((16, 16, 16), np.uint8)
    truth[4:10, 4:10, 4:10] = 1
    prob = np.where(truth, 0.9, 0.0).astype(np.float32)
    prob[3:11, 3:11, 3:11] = np.maximum(prob[3:11, 3:11, 3:11], 0.55)
    volume = {"image": prob, "brain": np.ones_like(truth), "mask": truth, "spacing_mm": 2.0,
              "hu": np.full(truth.shape, 60.0, np.float16)}
    return volume, prob, truth


def test_the_chosen_threshold_is_the_one_of_best_validation_dsc():
    from types import SimpleNamespace

    from mlssp_jax import wholescan
    volume, prob, truth = _cube_with_a_rim()
    cfg = SimpleNamespace(postprocess_min_ml=(), postprocess_thresholds=(0.5, 0.6),
                          postprocess_max_hu=0.0, threshold=0.5, postprocess_select="dsc")
    rule, scored = wholescan.choose_postprocessing([volume], [prob], cfg)
    assert rule == {"name": "none", "threshold": 0.6}
    assert wholescan.dsc(wholescan.postprocessed(volume, prob, rule, 0.5), truth) == 1.0
    assert max(s["score"] for s in scored if s["rule"]["threshold"] == 0.5) < 1.0


def test_volume_selection_keeps_the_best_components_and_the_least_biased_threshold():
    rules = postprocess.candidates([1.0], (0.5, 0.7, 0.9))
    def row(rule, score, bias):
        return {"rule": rule, "score": score, "median_volume_error_ml": bias}
    # by DSC: "largest"@0.5; its volumes are +2.0 / -0.3 / -1.1 mL off at 0.5 / 0.7 / 0.9,
    # and "none"@0.7 is unbiased but keeps every component (not the rule DSC chose)
    bias = {("none", 0.7): 0.0, ("largest", 0.5): 2.0, ("largest", 0.7): -0.3,
            ("largest", 0.9): -1.1}
    scored = [row(r, 0.80 + 0.05 * (r["name"] == "largest" and r["threshold"] == 0.5),
                  bias.get((r["name"], r["threshold"]), 5.0)) for r in rules]
    assert postprocess.choose_scored(scored, "dsc") == {"name": "largest", "threshold": 0.5}
    assert postprocess.choose_scored(scored, "volume") == {"name": "largest", "threshold": 0.7}
    tied = [dict(s, median_volume_error_ml=0.5) for s in scored]  # equal bias: better DSC
    assert postprocess.choose_scored(tied, "volume") == {"name": "largest", "threshold": 0.5}
    native = [dict(s, median_volume_error_native_ml=s["median_volume_error_ml"] - 0.3)
              for s in scored]  # the scans' grids' own errors decide: here 0.7 (-0.6 mL) ...
    assert postprocess.choose_scored(native, "volume_native") == {"name": "largest",
                                                                 "threshold": 0.7}
    native[[s["rule"] for s in native].index({"name": "largest", "threshold": 0.9})][
        "median_volume_error_native_ml"] = -0.1  # ... and 0.9 once it is the least biased there
    assert postprocess.choose_scored(native, "volume_native") == {"name": "largest",
                                                                 "threshold": 0.9}
    with pytest.raises(ValueError, match="selection"):
        postprocess.choose_scored(scored, "median")


def test_the_volume_choice_takes_the_threshold_of_unbiased_validation_volumes():
    from types import SimpleNamespace

    from mlssp_jax import wholescan
    volume, prob, truth = _cube_with_a_rim()
    cfg = SimpleNamespace(postprocess_min_ml=(), postprocess_thresholds=(0.5, 0.6, 0.95),
                          postprocess_max_hu=0.0, threshold=0.5, postprocess_select="volume")
    rule, scored = wholescan.choose_postprocessing([volume], [prob], cfg)
    assert rule == {"name": "none", "threshold": 0.6}
    by_threshold = {s["rule"]["threshold"]: s["median_volume_error_ml"] for s in scored
                    if s["rule"]["name"] == "none"}
    rim_ml = (8**3 - 6**3) * 8 / 1000  # the 0.55 rim's voxels, 2 mm each
    assert by_threshold == pytest.approx({0.5: rim_ml, 0.6: 0.0, 0.95: -216 * 8 / 1000})


def test_validation_scores_match_the_masks_each_rule_makes():
    from mlssp_jax import wholescan
    rng = np.random.default_rng(0)
    volumes, probs = [], []
    for _ in range(3):
        truth = np.zeros((16, 16, 16), np.uint8)
        truth[3:9, 4:11, 5:10] = 1
        prob = np.clip(truth * 0.7 + rng.uniform(0, 0.6, truth.shape), 0, 1).astype(np.float32)
        hu = rng.uniform(0, 200, truth.shape).astype(np.float16)
        brain = np.ones_like(truth)
        brain[:, :, :2] = 0
        volumes.append({"brain": brain, "mask": truth, "spacing_mm": 2.0, "hu": hu})
        probs.append(prob)
    rules = postprocess.candidates([0.01, 0.05], (0.5, 0.8), 150.0) + [{"name": "largest"}]
    for rule, got in zip(rules, wholescan.validation_scores(volumes, probs, rules, 0.6),
                         strict=True):
        masks = [wholescan.postprocessed(v, p, rule, 0.6)
                 for v, p in zip(volumes, probs, strict=True)]
        want_dsc = np.mean([wholescan.dsc(m, v["mask"])
                            for m, v in zip(masks, volumes, strict=True)])
        want_err = np.median([(m.sum() - v["mask"].sum()) * 8e-3
                              for m, v in zip(masks, volumes, strict=True)])
        assert got["score"] == pytest.approx(want_dsc, abs=1e-12), rule
        assert got["median_volume_error_ml"] == pytest.approx(want_err, abs=1e-9), rule


def test_the_scan_grid_volume_choice_scores_the_masks_predict_writes(tmp_path):
    """``volume_native``: the best component rule's thresholds scored by the masks resampled
    onto the scan's own 1 mm grid (as predict writes them) against the mask there."""
    from types import SimpleNamespace

    from mlssp_jax import nifti, wholescan
    volume, prob, truth = _cube_with_a_rim()
    fine = truth.repeat(2, 0).repeat(2, 1).repeat(2, 2)  # 1 mm voxels j = 2i, 2i + 1
    native_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    native_affine[:3, 3] = -0.5  # their centres at 2i -+ 0.5 mm, the 2 mm voxel's at 2i
    nifti.save(tmp_path / "mask.nii.gz", fine, native_affine)
    volume = {**volume, "affine": np.diag([2.0, 2.0, 2.0, 1.0]),
              "native_mask_path": tmp_path / "mask.nii.gz"}
    cfg = SimpleNamespace(postprocess_min_ml=(), postprocess_thresholds=(0.5, 0.6, 0.7, 0.8),
                          postprocess_max_hu=0.0, threshold=0.5,
                          postprocess_select="volume_native")
    rule, scored = wholescan.choose_postprocessing([volume], [prob], cfg)
    errors = {}
    for row in scored:
        t = row["rule"]["threshold"]
        if row["rule"]["name"] != "none":  # the best DSC's components ("none" at 0.6)
            assert row["median_volume_error_native_ml"] is None
            continue
        mask = wholescan.postprocessed(volume, prob, row["rule"], 0.5)
        native = wholescan.native_metrics(volume, prob, mask, t)
        errors[t] = native["volume_native_ml"] - native["true_volume_native_ml"]
        assert row["median_volume_error_native_ml"] == pytest.approx(errors[t])
    assert rule == {"name": "none", "threshold": min(errors, key=lambda t: abs(errors[t]))}
    # between the 0.9 core and the 0.55 rim the interpolated surface moves with the threshold
    assert errors[0.5] > errors[0.6] > errors[0.8] and len(set(errors.values())) == 4
    with pytest.raises(ValueError, match="native_mask_path"):
        wholescan.choose_postprocessing([{**volume, "native_mask_path": None}], [prob], cfg)
