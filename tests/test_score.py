"""``python -m mlssp_jax.score``: predict's masks and probabilities against reference masks and
labels on each scan's own grid; hand-computed figures; bad input rejected before writing."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlssp_jax import nifti, score
from mlssp_jax.cli import run_command

SHAPE = (30, 30, 8)
SPACING = (1.0, 0.5, 2.0)  # mm: a voxel is 1 mm^3 = 0.001 mL
AFFINE = np.diag([*SPACING, 1.0])


def _lesion(lo: int, size: int) -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[lo:lo + size, lo:lo + size, 2:6] = 1
    return mask


def _cohort(folder: Path, predicted: dict, probs: dict) -> tuple[Path, Path]:
    """Reference scans/masks for subjects a-d (a 10x10x4 lesion each, labels 1, 0, 1, 0) and
    predict's outputs: ``predicted[id]`` the mask, ``probs[id]`` its avm_probability."""
    data, out = folder / "data", folder / "predictions"
    data.mkdir()
    out.mkdir()
    rows = ["subject_id,image,mask,label"]
    for n, sid in enumerate("abcd"):
        nifti.save(data / f"scan_{sid}.nii.gz", np.zeros(SHAPE, np.int16), AFFINE)
        nifti.save(data / f"{sid}_mask.nii.gz", _lesion(5, 10), AFFINE)
        rows.append(f"{sid},scan_{sid}.nii.gz,{sid}_mask.nii.gz,{(n + 1) % 2}")
        nifti.save(out / f"scan_{sid}_mask.nii.gz", predicted[sid], AFFINE)
        (out / f"scan_{sid}.json").write_text(json.dumps({"avm_probability": probs[sid]}))
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    return data / "manifest.csv", out


PERFECT = {sid: _lesion(5, 10) for sid in "abcd"}
RANKED = {"a": 0.9, "b": 0.2, "c": 0.6, "d": 0.4}  # every label right at 0.5


def test_perfect_predictions_score_one_and_no_error(tmp_path, capsys):
    manifest, out = _cohort(tmp_path, PERFECT, RANKED)
    assert run_command(score.main, ["--predictions", str(out), "--data", str(manifest),
                                    "--bootstrap", "50"]) == 0
    result = json.loads((out / "score.json").read_text())
    seg, cls = result["segmentation"], result["classification"]
    assert seg["dsc"] == 1.0 and seg["median_abs_volume_error_ml"] == 0.0
    assert seg["detected"] == 4 and seg["median_false_positive_ml"] == 0.0
    assert result["per_subject"][0]["true_volume_ml"] == pytest.approx(0.4)  # 400 voxels of 1 mm^3
    assert cls["auc"] == 1.0 and cls["accuracy"] == 1.0 and cls["n_subjects"] == 4
    assert "DSC 1.000" in capsys.readouterr().out


def test_figures_of_a_grown_a_shrunk_and_a_far_off_mask(tmp_path):
    far = _lesion(5, 10)
    far[25:29, 25:29, 2:4] = 1  # 32 voxels >= 12 mm from the lesion: false positive
    predicted = {"a": _lesion(5, 12), "b": _lesion(6, 8), "c": far, "d": np.zeros(SHAPE, np.uint8)}
    manifest, out = _cohort(tmp_path, predicted, {**RANKED, "d": 0.7})
    target = tmp_path / "s.json"
    assert run_command(score.main, ["--predictions", str(out), "--data", str(manifest),
                                    "--out", str(target), "--bootstrap", "50"]) == 0
    result = json.loads(target.read_text())
    rows = {r["subject_id"]: r for r in result["per_subject"]}
    assert rows["a"]["signed_volume_error_ml"] == pytest.approx((576 - 400) / 1000)
    assert rows["a"]["dsc"] == pytest.approx(2 * 400 / (576 + 400))
    assert rows["b"]["signed_volume_error_ml"] == pytest.approx((256 - 400) / 1000)
    assert rows["c"]["false_positive_ml"] == pytest.approx(0.032)
    assert rows["d"]["dsc"] == 0.0 and not rows["d"]["detected"] and rows["d"]["hd95_mm"] is None
    seg = result["segmentation"]
    assert seg["detected"] == 3
    assert seg["median_signed_volume_error_ml"] == pytest.approx(np.median([0.176, -0.144,
                                                                            0.032, -0.4]))
    assert result["classification"]["accuracy"] == 0.75  # d (label 0) at 0.7
    assert not (out / "score.json").exists()


def _rejected(argv, capsys, *unwritten: Path) -> str:
    code = run_command(score.main, argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    for path in unwritten:
        assert not path.exists()
    return err


def test_missing_or_mismatched_predictions_are_rejected_before_writing(tmp_path, capsys):
    manifest, out = _cohort(tmp_path, PERFECT, RANKED)
    argv = ["--predictions", str(out), "--data", str(manifest)]
    (out / "scan_c.json").unlink()
    assert "scan_c.json: missing" in _rejected(argv, capsys, out / "score.json")
    (out / "scan_c.json").write_text("[1, 2]")
    assert "scan_c.json: not predict's JSON" in _rejected(argv, capsys, out / "score.json")
    (out / "scan_c.json").write_text('{"avm_probability": 1.5}')
    assert "avm_probability must be" in _rejected(argv, capsys, out / "score.json")
    (out / "scan_c.json").write_text('{"avm_probability": 0.6, "threshold": 0.4}')
    assert "different thresholds" in _rejected(argv, capsys, out / "score.json")
    (out / "scan_c.json").write_text('{"avm_probability": 0.6}')
    nifti.save(out / "scan_b_mask.nii.gz", _lesion(5, 10)[:, :, :6], AFFINE)
    assert "does not match" in _rejected(argv, capsys, out / "score.json")
    nifti.save(out / "scan_b_mask.nii.gz", 3 * _lesion(5, 10), AFFINE)
    assert "mask values must be 0 or 1" in _rejected(argv, capsys, out / "score.json")
    nifti.save(out / "scan_b_mask.nii.gz", _lesion(5, 10), AFFINE)
    assert "--out must be" in _rejected([*argv, "--out", str(tmp_path / "no" / "s.json")],
                                        capsys, tmp_path / "no")
    assert run_command(score.main, argv) == 0


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=30), st.binary(max_size=30).map(repr)))
def test_any_json_text_is_scored_or_rejected_cleanly(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("score_json")
    (folder / "p.json").write_text(text)
    try:
        value = score.read_probability(folder / "p.json")
    except score.InputError as err:
        assert str(err).startswith(str(folder / "p.json"))
    else:
        probability, threshold = value
        assert probability is None or 0.0 <= probability <= 1.0
        assert 0.0 <= threshold <= 1.0
