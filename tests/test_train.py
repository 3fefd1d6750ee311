"""``python -m mlssp_jax.train`` end to end on the tiny cohort: outputs, lr decay, resume, errors.

The runs share the session's tiny run (conftest.py ``tiny_run``: the tiny config of helpers.py,
2 epochs of fold 0, a subprocess) and the session's persistent XLA compilation cache, so only
the first one compiles.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT, run_train, train_command, train_env

from mlssp_jax import checkpointing, cli, rundir, train

SEG_KEYS = set(rundir.SEG_KEYS)


def test_trains_one_fold_and_writes_every_output(tiny_run):
    fold = tiny_run / "fold_0"
    records = rundir.read_jsonl(fold / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert {"step", "lr", "train_loss", "dice", "bce", "val_dsc", "val_auc",
                "val_score", "seconds"} <= set(r)
        assert np.isfinite(r["train_loss"])
    assert records[1]["lr"] == pytest.approx(0.95 * records[0]["lr"], rel=1e-6)
    assert records[0]["lr"] == pytest.approx(1e-3, rel=1e-6)

    result = json.loads((fold / "eval.json").read_text())
    assert (result["fold"], result["alpha"], result["model"]) == (0, 0.4, "mlssp")
    seg, cls = result["segmentation"], result["classification"]
    assert SEG_KEYS | {"threshold", "per_subject"} == set(seg)
    assert {"accuracy", "sensitivity", "specificity", "auc", "brier", "ece", "calibration",
            "threshold", "per_subject"} == set(cls)
    assert cls["calibration"]["method"] == "none"  # train.calibration is off
    test_ids = json.loads((tiny_run / "splits.json").read_text())["folds"][0]["test"]
    assert [s["subject_id"] for s in seg["per_subject"]] == test_ids
    assert all(set(s) == SEG_KEYS | {"subject_id"} for s in seg["per_subject"])
    assert [s["subject_id"] for s in cls["per_subject"]] == test_ids
    assert all(0.0 <= s["prob"] <= 1.0 and s["label"] in (0, 1) for s in cls["per_subject"])

    for subject_id in test_ids:
        with np.load(fold / "predictions" / f"{subject_id}.npz") as npz:
            assert npz["pred"].shape == npz["mask"].shape == npz["image"].shape == (16, 16, 16)
            assert (npz["pred"].dtype, npz["prob"].dtype) == (np.uint8, np.float16)
    assert "voi_size = 16" in (tiny_run / "config.toml").read_text()


WHOLE_SEG_KEYS = {"dsc", "hd95_mm", "volume_error_ml", "false_positive_ml", "detected",
                  "dsc_native", "volume_error_native_ml"}


def test_whole_scan_block_and_post_processing_of_a_run(tiny_run):
    fold = tiny_run / "fold_0"
    whole = json.loads((fold / "eval.json").read_text())["whole_scan"]
    test_ids = json.loads((tiny_run / "splits.json").read_text())["folds"][0]["test"]
    assert set(whole["segmentation"]) == WHOLE_SEG_KEYS | {"per_subject"}
    assert [s["subject_id"] for s in whole["segmentation"]["per_subject"]] == test_ids
    assert all(s["false_positive_ml"] >= 0 for s in whole["segmentation"]["per_subject"])
    # scored on each scan's own grid too: the manifest names every mask
    assert all(0 <= s["dsc_native"] <= 1 and s["volume_error_native_ml"] >= 0
               for s in whole["segmentation"]["per_subject"])
    assert [s["subject_id"] for s in whole["classification"]["per_subject"]] == test_ids
    chosen = json.loads((fold / "postprocessing.json").read_text())
    assert chosen["rule"]["name"] in ("none", "largest", "min_ml")
    assert len(chosen["validation"]) == 2 + 3  # none, largest, the default min_ml values
    voi = json.loads((fold / "eval.json").read_text())["segmentation"]  # the same threshold
    assert voi["threshold"] == chosen["rule"].get("threshold", 0.5)


def test_whole_volume_sampling_trains_and_selects_on_whole_scans(tiny_config, tiny_cohort,
                                                                tmp_path):
    workdir = tmp_path / "whole"
    run_train(train_env(), *train_command(tiny_config, tiny_cohort, workdir, "--epochs", "1",
                                          "--set", 'data.sampling="whole_volume"',
                                          "--set", "augment.hu_noise_max=5",
                                          "--set", "train.seg_bce_weight=1",
                                          "--set", 'train.calibration="platt"'))
    (record,) = rundir.read_jsonl(workdir / "fold_0" / "metrics.jsonl")
    assert {"val_dsc", "val_false_positive_ml", "val_postprocessing", "seg_bce"} <= set(record)
    result = json.loads((workdir / "fold_0" / "eval.json").read_text())
    assert set(result["whole_scan"]["segmentation"]) == WHOLE_SEG_KEYS | {"per_subject"}
    assert result["segmentation"] is not None  # the paper's protocol beside it
    # one calibration, fitted on the inner-validation whole scans, applied to both protocols
    saved = json.loads((workdir / "fold_0" / "calibration.json").read_text())
    assert saved["method"] == "platt" and saved["n"] >= 1
    assert result["classification"]["calibration"] == saved
    assert result["whole_scan"]["classification"]["calibration"] == saved


def test_best_params_restore_for_inference(tiny_run):
    params, config = checkpointing.restore_best_params(tiny_run, 0)
    assert config.model.width == 4
    kernel = params["stem"]["conv0"]["kernel"]
    assert kernel.shape == (3, 3, 3, 1, 4) and np.all(np.isfinite(np.asarray(kernel)))


def test_killed_run_resumes_to_the_same_losses(tiny_run, tiny_config, tiny_cohort, tmp_path):
    """SIGKILL a 3-epoch run once checkpoint 1 exists, --resume: epochs 1-2 match the tiny run."""
    workdir, env = tmp_path / "killed_run", train_env()
    command = train_command(tiny_config, tiny_cohort, workdir, "--epochs", "3")
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    checkpoints = workdir / "fold_0" / "checkpoints"
    try:
        while proc.poll() is None and not (checkpoints / "1").is_dir():
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit())
    assert "3" not in killed_at, "the run finished before it was killed"

    run_train(env, *command, "--resume")
    resumed = rundir.read_jsonl(workdir / "fold_0" / "metrics.jsonl")
    reference = rundir.read_jsonl(tiny_run / "fold_0" / "metrics.jsonl")
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    for a, b in zip(resumed[:2], reference, strict=True):
        for key in ("step", "lr", "train_loss", "dice", "bce", "val_dsc", "val_score"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert (workdir / "fold_0" / "eval.json").is_file()


def test_existing_checkpoints_without_resume_is_an_error(tiny_run, tiny_config, tiny_cohort,
                                                         capsys):
    before = sorted(p.name for p in (tiny_run / "fold_0" / "checkpoints").iterdir())
    argv = train_command(tiny_config, tiny_cohort, tiny_run)[3:]  # after python -m mlssp_jax.train
    assert cli.run_command(train.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "--resume" in err[-1]
    assert sorted(p.name for p in (tiny_run / "fold_0" / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("args, message", [
    (["--fold", "7"], "--fold"),
    (["--fold", "0", "--alpha", "1.5"], "train.alpha"),
    (["--fold", "0", "--set", "model.widht=4"], "model.widht"),
])
def test_bad_options_exit_2_with_one_error_line(args, message, tmp_path, capsys):
    code = cli.run_command(train.main, ["--workdir", str(tmp_path / "w"), *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "w").exists()


QUICK_TEST_EPOCHS = 12


def test_quick_config_learns_one_fold(tmp_path):
    """README's main job (configs/quick.toml, fold 2): the lesion found on held-out whole scans.

    The slowest test (minutes on a busy 2-core CPU): it generates and preprocesses the
    40-subject cohort, compiles the 32^3 model and trains the first 12 of the config's 20
    epochs (the learning rate decays per epoch, so they are the shipped run's first 12; the
    last 8 would add ~70 s to a suite kept under 10 minutes). Floors are conservative (README
    has the figures seen on the 8 held-out subjects; 0.882 whole-scan DSC at 12 epochs).
    """
    workdir = tmp_path / "quick_run"
    run_train(train_env(), sys.executable, "-m", "mlssp_jax.train", "--config",
              str(ROOT / "configs" / "quick.toml"), "--fold", "2", "--alpha", "0.4",
              "--workdir", str(workdir), "--set", f"train.epochs={QUICK_TEST_EPOCHS}")
    result = json.loads((workdir / "fold_2" / "eval.json").read_text())
    whole = result["whole_scan"]["segmentation"]
    assert whole["dsc"] > 0.4 and whole["detected"] > 0.5
    assert result["segmentation"]["dsc"] > 0.4
    # the descriptor classifier on the lesions the pipeline found (AUC 1.0 seen; chance 0.5)
    assert result["whole_scan"]["descriptor_classification"]["auc"] >= 0.75


def test_a_model_the_config_cannot_build_fails_before_writing_anything(tiny_config,
                                                                       tiny_cohort, tmp_path,
                                                                       capsys):
    workdir = tmp_path / "w"
    argv = train_command(tiny_config, tiny_cohort, workdir)[3:]  # after python -m mlssp_jax.train
    code = cli.run_command(train.main, [*argv, "--model", "cnn", "--set", "model.share_depth=2"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert lines[-1].startswith("error: ") and "model.share_depth" in lines[-1]
    assert not workdir.exists()


def test_a_batch_the_fold_cannot_fill_fails_before_writing_anything(tiny_config, tiny_cohort,
                                                                     tmp_path, capsys):
    workdir = tmp_path / "w"
    argv = train_command(tiny_config, tiny_cohort, workdir)[3:]  # after python -m mlssp_jax.train
    code = cli.run_command(train.main, [*argv, "--batch-size", "1000"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert lines[-1].startswith("error: ") and "train.batch_size" in lines[-1]
    assert not workdir.exists()  # no splits.json, no config.toml
