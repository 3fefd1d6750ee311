"""train_lib and train_step without a compiled model: lr schedule, NaN stop, early checks."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from mlssp_jax import (
    cli,
    input_pipeline,
    parallel,
    preprocess,
    train,
    train_lib,
    train_step,
)
from mlssp_jax import config as config_lib
from mlssp_jax.errors import InputError, TrainingDiverged
from mlssp_jax.ops import onednn


def test_learning_rate_decays_five_percent_per_epoch_not_per_step():
    cfg = config_lib.TrainConfig(learning_rate=1e-3, lr_decay_per_epoch=0.05)
    lr = train_step.create_learning_rate_fn(cfg, steps_per_epoch=7)
    for step in range(0, 40):
        assert float(lr(step)) == pytest.approx(1e-3 * 0.95 ** (step // 7), rel=1e-6)


def test_warmup_rises_linearly_then_the_per_epoch_decay_takes_over():
    """Warm-up over 2 epochs of 5 steps: lr * (step + 1) / 10 * 0.95 ** epoch, then the decay
    alone (epochs counted from the first step, as without warm-up)."""
    cfg = config_lib.TrainConfig(learning_rate=1e-3, lr_decay_per_epoch=0.05, warmup_epochs=2)
    lr = train_step.create_learning_rate_fn(cfg, steps_per_epoch=5)
    for step in range(30):
        expected = 1e-3 * 0.95 ** (step // 5) * min(1.0, (step + 1) / 10)
        assert float(lr(step)) == pytest.approx(expected, rel=1e-6)
    assert float(lr(0)) < float(lr(4)) < float(lr(9))


def test_gradient_clipping_bounds_the_first_adam_step_only_when_asked():
    """Adam's first step moves every parameter by ~lr whatever the gradient's scale; with
    clipping the gradient's global norm is cut to grad_clip_norm first, which shows in the
    state (the clip's empty state before Adam's) and in Adam's first moment."""
    grads = {"w": jnp.full((4,), 100.0)}  # global norm 200
    params = {"w": jnp.zeros((4,))}
    for clip, expected_mu in ((0.0, 10.0), (2.0, 0.1)):
        cfg = config_lib.TrainConfig(learning_rate=1e-3, grad_clip_norm=clip)
        tx = train_step.create_optimizer(cfg, steps_per_epoch=5)
        state = tx.init(params)
        _, state = tx.update(grads, state, params)
        adam_state = state[-1][0] if clip else state[0]
        np.testing.assert_allclose(adam_state.mu["w"], expected_mu, rtol=1e-5)


@struct.dataclass
class FakeState:
    step: jnp.ndarray


def test_nan_loss_stops_the_epoch_naming_the_step(monkeypatch):
    """A NaN at the 3rd step of epoch 2 raises TrainingDiverged naming step 8 and epoch 2."""
    batch = {"image": np.zeros((2, 16, 16, 16, 1), np.float32), "label": np.zeros(2, np.float32)}
    monkeypatch.setattr(input_pipeline, "train_batches", lambda *a, **k: iter([batch] * 5))
    monkeypatch.setattr(input_pipeline, "steps_per_epoch", lambda n, b: 5)
    seen = []

    def fake_step(state, sharded):
        seen.append(int(state.step))
        loss = math.nan if int(state.step) == 7 else 0.5
        return state.replace(step=state.step + 1), {"loss": jnp.float32(loss), "lr": 1.0}

    config = config_lib.Config(train=config_lib.TrainConfig(batch_size=2))
    mesh = parallel.make_mesh()
    with pytest.raises(TrainingDiverged, match=r"nan at step 8 \(epoch 2\)"):
        train_lib.train_epoch(fake_step, FakeState(jnp.int32(5)), [{}] * 10, config, 1, mesh)
    assert seen == [5, 6, 7]


def test_train_command_reports_divergence_as_one_error_line(monkeypatch, capsys, tmp_path):
    def diverge(*args, **kwargs):
        raise TrainingDiverged("loss is nan at step 8 (epoch 2)")

    monkeypatch.setattr(train_lib, "train_and_evaluate", diverge)
    assert train.main(["--fold", "0", "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: loss is nan at step 8 (epoch 2); the last good checkpoint")


def test_conv_impl_that_cannot_run_fails_before_writing_anything(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(onednn, "status", lambda: onednn.Status(False, "no C++ compiler found"))
    workdir = tmp_path / "run"
    argv = ["--fold", "0", "--workdir", str(workdir), "--set", 'model.conv_impl="onednn"']
    assert cli.run_command(train.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: model.conv_impl = 'onednn' cannot run here: "
                       "no C++ compiler found")
    assert not workdir.exists()


class Stop(Exception):
    pass


@pytest.mark.parametrize("workers, processes", [(0, 1), (1, 1), (3, 3)])
def test_preprocessing_runs_train_workers_processes_and_0_in_this_one(
        workers, processes, tiny_cohort, tmp_path, monkeypatch):
    """train.workers = 0 preprocesses in this process (1 worker), not one per CPU."""
    seen = []

    def cached_cohort(manifest_path, data_cfg, workers=None, subjects=None):
        seen.append(workers)
        raise Stop

    monkeypatch.setattr(preprocess, "cached_cohort", cached_cohort)
    config = config_lib.apply_overrides(config_lib.Config(), [
        f'data.manifest="{tiny_cohort}"', f"train.workers={workers}"])
    with pytest.raises(Stop):
        train_lib.load_fold_data(config, tmp_path, fold=0)
    assert seen == [processes]


def test_a_workdir_of_another_config_is_refused_before_the_cohort_is_made(
        monkeypatch, capsys, tmp_path):
    """The default synthetic cohort takes minutes to make: the config check comes first."""
    made = []
    monkeypatch.setattr(preprocess, "resolve_data", lambda data_cfg: made.append(1))
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.toml").write_text(config_lib.to_toml(config_lib.Config()))
    argv = ["--fold", "0", "--workdir", str(workdir), "--epochs", "3"]
    assert cli.run_command(train.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "another config" in err[-1]
    assert made == []


def test_a_split_of_other_subjects_is_refused_before_preprocessing(tiny_cohort, tmp_path,
                                                                   monkeypatch):
    def cached_cohort(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(preprocess, "cached_cohort", cached_cohort)
    config = config_lib.apply_overrides(config_lib.Config(), [f'data.manifest="{tiny_cohort}"'])
    (tmp_path / "splits.json").write_text(json.dumps({"folds": [], "subjects": {"x": 0}}))
    with pytest.raises(InputError, match="saved split has a different"):
        train_lib.load_fold_data(config, tmp_path, fold=0)


def test_time_left_leaves_out_the_compiling_first_epoch():
    assert train_lib.time_left([30.0], 4) == 120.0
    assert train_lib.time_left([30.0, 2.0, 4.0], 10) == 30.0
    assert train_lib.time_left([30.0, 2.0], 0) == 0.0
    assert train_lib.format_duration(42) == "42 s"
    assert train_lib.format_duration(126 * 98) == "3.4 h"
