"""``python -m mlssp_jax.experiment``: a diverged training is one ``error:`` line (the sweep
itself is tested with fake trainings in test_report.py)."""

from __future__ import annotations

from mlssp_jax import experiment
from mlssp_jax.cli import run_command
from mlssp_jax.errors import TrainingDiverged


def test_a_diverged_fold_is_one_error_line(monkeypatch, capsys, tmp_path):
    def diverge(cfg, workdir, fold, resume):
        raise TrainingDiverged("loss is nan at step 8 (epoch 2)")

    monkeypatch.setattr(experiment.train_lib, "train_and_evaluate", diverge)
    monkeypatch.setattr(experiment, "use_compilation_cache", lambda out: None)
    argv = ["--out", str(tmp_path / "exp"), "--alphas", "0.4", "--models", ""]
    assert run_command(experiment.main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line.lower() or "Traceback" in line]
    assert errors == [err[-1]] and err[-1].startswith("error: ")
    assert "mlssp_alpha0.4 fold 0: loss is nan at step 8 (epoch 2)" in err[-1]
