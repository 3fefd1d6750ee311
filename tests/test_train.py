"""``python -m mlssp_jax.train`` end to end on the tiny cohort: outputs, lr decay, resume, errors.

Runs are subprocesses sharing a persistent XLA compilation cache, so only the first one
compiles. The tiny config: VOI 16^3, width 4, global batch 4, lr 1e-3, and XLA's own
convolutions (they compile ~3x faster than the CPU fast path, which tests/test_conv_ops.py
checks against them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mlssp_jax import checkpointing, cli, train

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = """
[data]
voi_size = 16
[model]
width = 4
dense_units = 8
conv_impl = "xla"
[train]
alpha = 0.4
learning_rate = 1e-3
batch_size = 4
epochs = 2
workers = 0
"""
SEG_KEYS = {"dsc", "sensitivity", "specificity", "ppv"}


def train_env(base_tmp: Path, devices: int = 1) -> dict[str, str]:
    """Environment of a training subprocess: CPU, shared compile and preprocessing caches."""
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(base_tmp / "jax_cache"),
            "MLSSP_JAX_CACHE": str(base_tmp / "mlssp_cache"),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def train_command(config: Path, manifest: Path, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mlssp_jax.train", "--config", str(config), "--data",
            str(manifest), "--workdir", str(workdir), "--fold", "0", *extra]


def run_train(env: dict, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == expect, done.stderr[-3000:]
    return done


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.getbasetemp() / "tiny_train.toml"
    path.write_text(TINY_CONFIG)
    return path


@pytest.fixture(scope="session")
def reference_run(tiny_config, tiny_cohort, tmp_path_factory) -> Path:
    """One uninterrupted 2-epoch run of fold 0, shared by this module and test_multihost
    (which imports this fixture: a second instance finds the finished run and reuses it)."""
    base = tmp_path_factory.getbasetemp()
    workdir = base / "reference_run"
    if not (workdir / "fold_0" / "eval.json").is_file():
        run_train(train_env(base), *train_command(tiny_config, tiny_cohort, workdir))
    return workdir


def test_trains_one_fold_and_writes_every_output(reference_run):
    fold = reference_run / "fold_0"
    records = read_jsonl(fold / "metrics.jsonl")
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
    assert SEG_KEYS | {"per_subject"} == set(seg)
    assert {"accuracy", "sensitivity", "specificity", "auc", "threshold", "per_subject"} == set(cls)
    test_ids = json.loads((reference_run / "splits.json").read_text())["folds"][0]["test"]
    assert [s["subject_id"] for s in seg["per_subject"]] == test_ids
    assert all(set(s) == SEG_KEYS | {"subject_id"} for s in seg["per_subject"])
    assert [s["subject_id"] for s in cls["per_subject"]] == test_ids
    assert all(0.0 <= s["prob"] <= 1.0 and s["label"] in (0, 1) for s in cls["per_subject"])

    for subject_id in test_ids:
        with np.load(fold / "predictions" / f"{subject_id}.npz") as npz:
            assert npz["pred"].shape == npz["mask"].shape == npz["image"].shape == (16, 16, 16)
            assert (npz["pred"].dtype, npz["prob"].dtype) == (np.uint8, np.float16)
    assert "voi_size = 16" in (reference_run / "config.toml").read_text()


def test_best_params_restore_for_inference(reference_run):
    params, config = checkpointing.restore_best_params(reference_run, 0)
    assert config.model.width == 4
    kernel = params["stem"]["conv0"]["kernel"]
    assert kernel.shape == (3, 3, 3, 1, 4) and np.all(np.isfinite(np.asarray(kernel)))


def test_killed_run_resumes_to_the_same_losses(reference_run, tiny_config, tiny_cohort,
                                              tmp_path_factory):
    """SIGKILL a 3-epoch run once checkpoint 1 exists, --resume: epochs 1-2 match the reference."""
    base = tmp_path_factory.getbasetemp()
    workdir, env = base / "killed_run", train_env(base)
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
    resumed = read_jsonl(workdir / "fold_0" / "metrics.jsonl")
    reference = read_jsonl(reference_run / "fold_0" / "metrics.jsonl")
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    for a, b in zip(resumed[:2], reference, strict=True):
        for key in ("step", "lr", "train_loss", "dice", "bce", "val_dsc", "val_score"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert (workdir / "fold_0" / "eval.json").is_file()


def test_existing_checkpoints_without_resume_is_an_error(reference_run, tiny_config, tiny_cohort,
                                                         tmp_path_factory):
    env = train_env(tmp_path_factory.getbasetemp())
    done = run_train(env, *train_command(tiny_config, tiny_cohort, reference_run), expect=2)
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "--resume" in done.stderr


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


def test_quick_config_learns_one_fold(tmp_path_factory):
    """README's main job (configs/quick.toml, fold 2): held-out DSC and AUC well above chance.

    The slowest test (~3-4 min on a shared 2-core CPU): it generates and preprocesses the
    40-subject cohort, compiles the 32^3 model and trains 12 epochs. Floors are conservative
    (seen: DSC 0.77, AUC 0.75 on the 8 held-out subjects).
    """
    base = tmp_path_factory.getbasetemp()
    workdir = base / "quick_run"
    run_train(train_env(base), sys.executable, "-m", "mlssp_jax.train", "--config",
              str(ROOT / "configs" / "quick.toml"), "--fold", "2", "--alpha", "0.4",
              "--workdir", str(workdir))
    result = json.loads((workdir / "fold_2" / "eval.json").read_text())
    assert result["segmentation"]["dsc"] > 0.4
    assert result["classification"]["auc"] > 0.6
