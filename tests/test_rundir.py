"""The run directory: default names, paths, finished folds, and runs made before hd95_mm and
volume_error_ml were recorded (helpers.write_fake_run writes that older layout)."""

from __future__ import annotations

import json

import pytest
from helpers import FOLDS, write_fake_run

from mlssp_jax import config, evaluate, report, rundir
from mlssp_jax.errors import InputError


def test_default_workdir_is_named_after_config_model_and_alpha():
    cfg = config.Config()
    quick = rundir.default_workdir("configs/quick.toml", cfg)
    assert quick == rundir.DEFAULT_ROOT / "quick_mlssp_alpha0.4"
    assert rundir.default_workdir(None, cfg) != quick  # built-in defaults (the paper)
    ynet = config.apply_overrides(cfg, ['model.name="ynet"', "train.alpha=0.5"])
    assert rundir.default_workdir("configs/quick.toml", ynet).name == "quick_ynet_alpha0.5"


def test_paths_and_finished_folds(tmp_path):
    assert rundir.eval_path(tmp_path, 3) == tmp_path / "fold_3" / "eval.json"
    assert rundir.checkpoint_dir(tmp_path, 3) == tmp_path / "fold_3" / "checkpoints"
    assert rundir.finished_folds(tmp_path, 5) == []
    rundir.write_eval(tmp_path, 1, {"fold": 1})
    rundir.write_eval(tmp_path, 4, {"fold": 4})
    assert rundir.finished_folds(tmp_path, 5) == [1, 4]
    evals, missing = rundir.read_evals(tmp_path, 5)
    assert sorted(evals) == [1, 4] and missing == [0, 2, 3]
    rundir.eval_path(tmp_path, 1).write_text("{not json")
    with pytest.raises(InputError, match=r"fold_1/eval\.json: not valid JSON"):
        rundir.read_evals(tmp_path, 5)


def test_metrics_jsonl_round_trip(tmp_path):
    assert rundir.read_metrics(tmp_path, 0) == []
    rundir.metrics_path(tmp_path, 0).parent.mkdir()
    rundir.write_metrics(tmp_path, 0, [{"epoch": 1}, {"epoch": 2}])
    assert rundir.read_metrics(tmp_path, 0) == [{"epoch": 1}, {"epoch": 2}]
    assert rundir.metrics_files(tmp_path) == [rundir.metrics_path(tmp_path, 0)]


def test_another_config_in_the_workdir_is_refused(tmp_path):
    cfg = config.Config()
    rundir.write_config(cfg, tmp_path)
    rundir.check_config(cfg, tmp_path)
    other = config.apply_overrides(cfg, ["train.epochs=3"])
    with pytest.raises(InputError, match="made with another config"):
        rundir.check_config(other, tmp_path)


def test_a_run_without_the_new_fields_still_pools_and_reports(tmp_path):
    """eval.json as written before hd95_mm/volume_error_ml: pooled without them, '-' in
    Table 1's new columns."""
    run = tmp_path / "mlssp_alpha0.4"
    write_fake_run(run)
    first = json.loads(rundir.eval_path(run, 0).read_text())
    assert "hd95_mm" not in first["segmentation"]
    summary = evaluate.summarize(run, n_resamples=20)
    assert summary["folds"] == list(range(FOLDS)) and "hd95_mm" not in summary["segmentation"]
    text = report.write_report([run], tmp_path / "report").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 0.4 |"))
    assert row.rstrip(" |").endswith("| - | -")
