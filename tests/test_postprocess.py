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
    assert postprocess.ensemble_rule(tmp_path, [0, 1, 2]) == {"name": "none"}
    assert postprocess.ensemble_rule(tmp_path, [0, 1]) == best  # a tie: the lowest fold's
    (tmp_path / "fold_3").mkdir()
    (tmp_path / "fold_3" / postprocess.FILE_NAME).write_text("{")
    with pytest.raises(InputError, match="fold_3"):
        postprocess.load(tmp_path / "fold_3")
