"""predict: whole-scan segmentation and classification, back on the input's grid.

The geometry (resampling back, volume, LPS vs RAS, the classification VOI) is tested exactly
with a toy model that segments a phantom's hematoma by its density; the command runs end to
end on the checkpoints of the session's tiny training run (conftest.py ``tiny_run``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import write_fake_run
from scipy import ndimage

from mlssp_jax import config, descriptor_eval, manifest, metrics, nifti, predict, rundir, score
from mlssp_jax import descriptor_classifier as clf
from mlssp_jax.cli import run_command
from mlssp_jax.descriptors import DESCRIPTOR_NAMES
from mlssp_jax.errors import InputError
from mlssp_jax.scans import scan_name

LESION_CENTRE_MM = np.array([10.0, -5.0, 4.0])
LESION_RADIUS_MM = 8.0


def phantom(shape=(60, 60, 20), spacing_mm=(1.5, 1.5, 4.0)):
    """A ball head in HU (brain 30, a 5 mm skull of 1000, air) with a 70 HU ball hematoma.

    RAS voxel order, anisotropic spacing, centred on the world origin. Returns (Volume, truth).
    """
    spacing = np.array(spacing_mm)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * spacing
    world = np.indices(shape).reshape(3, -1).T * spacing + affine[:3, 3]
    radius = np.linalg.norm(world, axis=1)
    hu = np.where(radius < 35, 30.0, np.where(radius < 40, 1000.0, -1000.0))
    lesion = np.linalg.norm(world - LESION_CENTRE_MM, axis=1) <= LESION_RADIUS_MM
    hu[lesion] = 70.0
    volume = nifti.Volume(data=hu.reshape(shape).astype(np.float32), affine=affine,
                          path=Path("phantom.nii.gz"))
    return volume, lesion.reshape(shape)


def toy_model(images):
    """Segmentation: windowed density in the hematoma's band (50-80 HU), opened by a 3^3 cube
    (drops the thin partial-volume rim of the skull); AVM probability: the VOI's mean."""
    band = (images >= 0.5) & (images <= 0.8)
    seg = ndimage.binary_opening(band, np.ones((1, 3, 3, 3, 1), bool))
    return {"seg_prob": seg.astype(np.float32), "cls_prob": images.mean(axis=(1, 2, 3, 4))}


def toy_config():
    return config.apply_overrides(config.Config(), ["data.voi_size=32", "inference.batch_size=8"])


@pytest.fixture(scope="module")
def toy_result():
    return predict.predict_scan(phantom()[0], toy_model, toy_config())


def dice(a, b):
    return 2 * np.sum(a & b) / (a.sum() + b.sum())


def test_resampling_back_puts_a_ball_at_its_world_position():
    """A 10 mm ball of probability on a 1 mm RAS grid lands on an oblique LPS 0.8x0.8x3 mm grid."""
    prob_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    prob_affine[:3, 3] = [-40, -40, -40]
    centre = np.array([3.0, -5.0, 7.0])
    world = np.indices((80, 80, 80)).reshape(3, -1).T + prob_affine[:3, 3]
    prob = (np.linalg.norm(world - centre, axis=1) <= 10).reshape(80, 80, 80).astype(np.float32)
    angle = np.deg2rad(10)
    cos, sin = np.cos(angle), np.sin(angle)
    rot = np.array([[-1, 0, 0], [0, -cos, -sin], [0, sin, cos]])
    input_affine = np.eye(4)
    input_affine[:3, :3] = rot @ np.diag([0.8, 0.8, 3.0])
    input_affine[:3, 3] = [30, 30, -25]
    shape = (75, 70, 18)
    mask = predict.resample_to_input(prob, prob_affine, input_affine, shape, 0.5)
    assert mask.shape == shape and mask.dtype == np.uint8
    index = np.indices(shape).reshape(3, -1).T
    dist = np.linalg.norm(index @ input_affine[:3, :3].T + input_affine[:3, 3] - centre, axis=1)
    flat = mask.ravel().astype(bool)
    assert flat[dist < 9.0].all() and not flat[dist > 11.0].any()


def test_toy_model_mask_is_on_the_input_grid_and_finds_the_lesion(toy_result):
    image, truth = phantom()
    mask = toy_result["mask"]
    assert mask.shape == image.data.shape and mask.dtype == np.uint8
    assert dice(mask > 0, truth) > 0.95
    voxel_ml = abs(np.linalg.det(image.affine[:3, :3])) / 1000
    assert toy_result["volume_ml"] == pytest.approx(mask.sum() * voxel_ml)
    np.testing.assert_allclose(toy_result["voi_centre_mm"], LESION_CENTRE_MM, atol=1.0)
    assert 0 < toy_result["avm_probability"] < 1 and toy_result["label"] in (0, 1)


def test_lps_copy_gives_the_same_mask_in_world_space(toy_result):
    image, _ = phantom(shape=(61, 59, 20))  # odd sizes: the flip is not a symmetry of the grid
    ras = predict.predict_scan(image, toy_model, toy_config())
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(image.data.shape[:2]) - 1  # index i -> n - 1 - i on axes 0 and 1
    lps = nifti.Volume(data=image.data[::-1, ::-1].copy(), affine=image.affine @ flip,
                       path=image.path)
    result = predict.predict_scan(lps, toy_model, toy_config())
    np.testing.assert_array_equal(result["mask"][::-1, ::-1], ras["mask"])
    assert result["volume_ml"] == pytest.approx(ras["volume_ml"])
    assert ras["mask"].sum() > 100


def test_bad_inputs_are_errors(tmp_path, capsys):
    (tmp_path / "scan.txt").write_text("not a scan")
    for argv in (["--workdir", str(tmp_path), "--image", str(tmp_path / "missing.nii.gz")],
                 ["--workdir", str(tmp_path), "--image", str(tmp_path / "scan.txt")],
                 ["--workdir", str(tmp_path), "--image", str(tmp_path)],
                 ["--workdir", str(tmp_path), "--image", str(tmp_path / "scan.txt"),
                  "--overlap", "1.5"],
                 ["--workdir", str(tmp_path), "--image", str(tmp_path / "scan.txt"),
                  "--window", "40"]):
        assert run_command(predict.main, argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:  # argparse's choices, before run_command
        predict.main(["--workdir", str(tmp_path), "--image", "x.nii", "--tta", "rotations"])
    assert exit_info.value.code == 2 and "--tta" in capsys.readouterr().err


def test_a_bad_inference_setting_in_the_run_s_config_is_one_error(tmp_path, capsys):
    write_fake_run(tmp_path / "run", model="mlssp")
    path = tmp_path / "run" / "config.toml"
    path.write_text(path.read_text().replace("overlap = 0.25", "overlap = 1.5"))
    image, _ = phantom()
    nib.save(nib.Nifti1Image(image.data, image.affine), tmp_path / "scan.nii.gz")
    argv = ["--workdir", str(tmp_path / "run"), "--image", str(tmp_path / "scan.nii.gz"),
            "--out", str(tmp_path / "out")]
    assert run_command(predict.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "inference.overlap" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_the_command_s_options_override_the_run_s_inference_section():
    args = predict._parser().parse_args(["--workdir", "W", "--image", "x", "--overlap", "0.5",
                                         "--no-gaussian", "--tta", "flips"])
    cfg = predict.with_options(toy_config(), args)
    assert (cfg.inference.overlap, cfg.inference.gaussian, cfg.inference.tta) == (0.5, False,
                                                                                  "flips")
    assert predict.window_settings(cfg) == (32, 0.5, 8)  # window 0: the VOI; batch from cfg
    default = predict.with_options(config.Config(), predict._parser().parse_args(
        ["--workdir", "W", "--image", "x"]))
    assert predict.window_settings(default) == (64, 0.25, 1)  # 64^3 VOI: one window a call


def test_a_run_without_segmentation_or_finished_folds_is_refused(tmp_path):
    write_fake_run(tmp_path / "cnn", model="cnn")
    with pytest.raises(InputError, match="no segmentation branch"):
        predict.load_ensemble(tmp_path / "cnn")
    write_fake_run(tmp_path / "mlssp", model="mlssp")
    for eval_json in (tmp_path / "mlssp").glob("fold_*/eval.json"):
        eval_json.unlink()
    with pytest.raises(InputError, match="no finished fold"):
        predict.load_ensemble(tmp_path / "mlssp")


def test_command_writes_mask_and_json_on_the_inputs_grid(tiny_run, tiny_cohort, tmp_path):
    scans = [s.image for s in manifest.read_manifest(tiny_cohort)[:2]]
    argv = ["--workdir", str(tiny_run), "--image", *map(str, scans), "--out",
            str(tmp_path / "out"), "--batch-size", "4", "--overlap", "0", "--tta", "flips",
            "--window", "32"]
    assert run_command(predict.main, argv) == 0
    for scan in scans:
        name = scan_name(scan)
        image = nifti.load_image(scan)
        mask = nifti.load_mask(tmp_path / "out" / f"{name}_mask.nii.gz", image,
                               require_lesion=False)
        assert mask.data.shape == image.data.shape
        record = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert record["tta"] == "flips" and record["window"] == 32
        voxel_ml = abs(np.linalg.det(image.affine[:3, :3])) / 1000
        assert record["volume_ml"] == pytest.approx(mask.data.sum() * voxel_ml)
        assert record["folds"] == [0] and 0 <= record["avm_probability"] <= 1
        assert set(record["descriptors"]) == set(DESCRIPTOR_NAMES)
        assert record["descriptors"]["volume_ml"] >= 0
        assert record["label"] == int(record["avm_probability"] >= record["threshold"])
        assert record["classifier"] == "cnn"  # the tiny config keeps the paper's default
        assert record["cnn_avm_probability"] == record["avm_probability"]
        _check_descriptor_probability(record, tiny_run)
    table = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert "descriptor_avm_probability" in table[0].split(",")
    _check_score(tiny_cohort, tmp_path / "out", tmp_path / "two.csv")


def _check_score(cohort, out, two):
    """``score`` on these predictions: the DSC of the mask files against the cohort's masks."""
    two.write_text("".join([f"{','.join(manifest.COLUMNS)}\n"] + [
        f"{s.subject_id},{s.image},{s.mask},{s.label}\n"
        for s in manifest.read_manifest(cohort)[:2]]))
    assert run_command(score.main, ["--predictions", str(out), "--data", str(two),
                                    "--bootstrap", "20"]) == 0
    result = json.loads((out / "score.json").read_text())
    for row, subject in zip(result["per_subject"], manifest.read_manifest(two), strict=True):
        truth = nifti.read_volume(subject.mask).data > 0.5
        pred = nifti.read_volume(out / f"{scan_name(subject.image)}_mask.nii.gz").data > 0.5
        assert row["dsc"] == pytest.approx(metrics.segmentation_metrics(pred, truth)["dsc"])


def _check_descriptor_probability(record, workdir):
    """The fold's descriptor classifier applied to the JSON's descriptors; None: no lesion."""
    if not record["descriptors"]["volume_ml"]:
        assert record["descriptor_avm_probability"] is None
        return
    model = clf.DescriptorClassifier.load(rundir.descriptor_classifier_path(workdir, 0))
    assert record["descriptor_classifier_folds"] == [0]
    assert record["descriptor_avm_probability"] == pytest.approx(
        model.predict_proba(clf.design_matrix([record["descriptors"]], model.features))[0])


def test_a_run_without_descriptor_classifiers_gives_null(tmp_path):
    """What predict's main does per scan, on a run trained before the descriptor classifier
    (no fold_K/descriptor_classifier.json): no model, so the probability is None (null)."""
    write_fake_run(tmp_path / "run")
    classifiers = descriptor_eval.load_fold_models(tmp_path / "run", [0, 1])
    described = {"volume_ml": 3.0, **dict.fromkeys(clf.DEFAULT_FEATURES, 1.0)}
    assert classifiers == [] and clf.lesion_probabilities(classifiers, [described]) == [None]


def test_command_refuses_an_unfinished_fold(tiny_run, tiny_cohort, tmp_path, capsys):
    scan = manifest.read_manifest(tiny_cohort)[0].image
    argv = ["--workdir", str(tiny_run), "--image", str(scan), "--fold", "3",
            "--out", str(tmp_path / "o")]
    assert run_command(predict.main, argv) == 2
    assert "--fold 3" in capsys.readouterr().err and not (tmp_path / "o").exists()


def _bad_scan(kind: str, good: Path, folder: Path) -> Path:
    """A damaged copy of the scan ``good`` (a .nii.gz) of the given kind."""
    img = nib.load(str(good))
    data = np.asarray(img.get_fdata(), dtype=np.float32)
    path = folder / f"{kind}.nii.gz"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "text":
        path = folder / "text.nii"
        path.write_text("not a scan\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind in ("4d", "2d", "nan"):
        data = {"4d": np.stack([data, data], -1), "2d": data[:, :, 0], "nan": data}[kind]
        if kind == "nan":
            data[1, 1, 1] = np.nan
        nib.save(nib.Nifti1Image(data, img.affine), str(path))
    else:  # singular: sform with a zero row, no qform
        path = folder / "singular.nii"
        nib.save(nib.Nifti1Image(data, img.affine), str(path))
        raw = bytearray(path.read_bytes())
        raw[252:256] = np.array([0, 1], np.int16).tobytes()  # qform_code, sform_code
        raw[312:328] = bytes(16)  # srow_z
        path.write_bytes(bytes(raw))
    return path


BAD_SCANS = {"truncated": "cannot read the voxel data", "text": "not a readable NIfTI",
             "empty": "not a readable NIfTI", "4d": "expected a 3-D image",
             "2d": "expected a 3-D image", "nan": "NaN", "singular": "singular affine"}


@pytest.mark.parametrize("kind", sorted(BAD_SCANS))
def test_a_bad_scan_is_one_error_and_no_output(kind, tiny_run, tiny_cohort, tmp_path, capsys):
    good = manifest.read_manifest(tiny_cohort)[0].image
    bad = _bad_scan(kind, good, tmp_path)
    argv = ["--workdir", str(tiny_run), "--image", str(good), str(bad), "--out",
            str(tmp_path / "out")]
    assert run_command(predict.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: ") and err.count("\n") == 1, err
    assert BAD_SCANS[kind] in err and not (tmp_path / "out").exists()


def _damage(run: Path, kind: str) -> None:
    if kind == "no config":
        (run / "config.toml").unlink()
    elif kind == "no finished fold":
        for path in run.glob("fold_*/eval.json"):
            path.unlink()
    else:  # damaged checkpoint: every large file of fold 0's checkpoints cut short
        for path in (run / "fold_0" / "checkpoints").rglob("*"):
            if path.is_file() and path.stat().st_size > 1000:
                path.write_bytes(path.read_bytes()[:100])


BAD_RUNS = {"no config": "config.toml: no such file",
            "no finished fold": "no finished fold",
            "damaged checkpoint": "cannot restore the best checkpoint"}


@pytest.mark.parametrize("kind", sorted(BAD_RUNS))
def test_a_bad_workdir_is_one_error_and_no_output(kind, tiny_run, tiny_cohort, tmp_path,
                                                  capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _damage(run, kind)
    scan = manifest.read_manifest(tiny_cohort)[0].image
    argv = ["--workdir", str(run), "--image", str(scan), "--out", str(tmp_path / "out")]
    assert run_command(predict.main, argv) == 2
    err = capsys.readouterr().err  # orbax may log warnings first
    errors = [line for line in err.split("\n") if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {run}"), err
    assert BAD_RUNS[kind] in errors[0] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("descriptor_prob, label", [(0.8, 1), (0.2, 0), (None, None)])
def test_the_descriptor_classifier_can_give_the_answer(descriptor_prob, label):
    """inference.classifier = descriptors: avm_probability and label are the descriptor
    classifier's (null without a lesion), the CNN's kept beside them."""
    result = {"avm_probability": 0.3, "label": 0, "descriptor_avm_probability": descriptor_prob}
    chosen = predict.with_classification(result, "descriptors", 0.5)
    assert chosen["avm_probability"] == descriptor_prob and chosen["label"] == label
    assert chosen["cnn_avm_probability"] == 0.3
    cnn = predict.with_classification(result, "cnn", 0.5)
    assert (cnn["avm_probability"], cnn["label"], cnn["cnn_avm_probability"]) == (0.3, 0, 0.3)


def test_descriptors_asked_without_classifiers_fall_back_to_the_cnn(caplog):
    assert predict.classification_source("descriptors", True) == "descriptors"
    assert predict.classification_source("cnn", True) == "cnn"
    assert predict.classification_source("descriptors", False) == "cnn"
    assert "no descriptor_classifier.json" in caplog.text
