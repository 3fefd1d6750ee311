"""train_lib pieces that need no compiled model: lr schedule, NaN stop, results, selection."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from mlssp_jax import cli, input_pipeline, onednn, parallel, preprocess, train, train_lib
from mlssp_jax import config as config_lib


def test_learning_rate_decays_five_percent_per_epoch_not_per_step():
    cfg = config_lib.TrainConfig(learning_rate=1e-3, lr_decay_per_epoch=0.05)
    lr = train_lib.create_learning_rate_fn(cfg, steps_per_epoch=7)
    for step in range(0, 40):
        assert float(lr(step)) == pytest.approx(1e-3 * 0.95 ** (step // 7), rel=1e-6)


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
    with pytest.raises(train_lib.TrainingDiverged, match=r"nan at step 8 \(epoch 2\)"):
        train_lib.train_epoch(fake_step, FakeState(jnp.int32(5)), [{}] * 10, config, 1, mesh)
    assert seen == [5, 6, 7]


def test_train_command_reports_divergence_as_one_error_line(monkeypatch, capsys, tmp_path):
    def diverge(*args, **kwargs):
        raise train_lib.TrainingDiverged("loss is nan at step 8 (epoch 2)")

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

    def cached_cohort(manifest_path, data_cfg, workers=None):
        seen.append(workers)
        raise Stop

    monkeypatch.setattr(preprocess, "cached_cohort", cached_cohort)
    config = config_lib.apply_overrides(config_lib.Config(), [
        f'data.manifest="{tiny_cohort}"', f"train.workers={workers}"])
    with pytest.raises(Stop):
        train_lib.load_fold_data(config, tmp_path, fold=0)
    assert seen == [processes]


def _pred(subject_id, label, truth, prob, cls_prob):
    return {"subject_id": subject_id, "label": label, "mask": truth, "seg_prob": prob,
            "cls_prob": cls_prob, "image": np.zeros_like(prob)}


def test_results_have_spec_fields_and_mean_per_subject_metrics():
    truth = np.zeros((4, 4, 4), bool)
    truth[1:3, 1:3, 1:3] = True  # 8 voxels
    half = np.where(truth, 0.9, 0.1)
    half[1, 1:3, 1:3] = 0.2  # 4 of 8 found, no false positives: dsc 2*4/(8+4) = 2/3
    preds = [_pred("a", 1, truth, np.where(truth, 0.9, 0.1), 0.8), _pred("b", 0, truth, half, 0.3)]
    seg = train_lib.segmentation_result(preds, 0.5)
    assert [s["subject_id"] for s in seg["per_subject"]] == ["a", "b"]
    assert seg["dsc"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert seg["sensitivity"] == pytest.approx(0.75)
    assert set(seg) == {"dsc", "sensitivity", "specificity", "ppv", "per_subject"}
    cls = train_lib.classification_result(preds, 0.5)
    assert set(cls) == {"accuracy", "sensitivity", "specificity", "auc", "brier", "ece",
                        "threshold", "per_subject"}
    assert (cls["accuracy"], cls["auc"]) == (1.0, 1.0)
    # probabilities 0.8 (AVM) and 0.3 (other): Brier (0.2^2 + 0.3^2) / 2, ECE (0.2 + 0.3) / 2
    assert cls["brier"] == pytest.approx(0.065)
    assert cls["ece"] == pytest.approx(0.25)
    assert cls["per_subject"][1] == {"subject_id": "b", "label": 0, "prob": 0.3}


def test_selection_score_is_mean_of_dsc_and_auc_falling_back_to_accuracy():
    assert train_lib.selection_score({"dsc": 0.6}, {"auc": 0.8, "accuracy": 0.5}) == 0.7
    assert train_lib.selection_score({"dsc": 0.6}, {"auc": None, "accuracy": 0.5}) == 0.55
    assert train_lib.selection_score(None, {"auc": 0.9, "accuracy": 0.5}) == 0.9
    assert train_lib.selection_score({"dsc": 0.4}, None) == 0.4


def _auto_weighting_run(train_cfg: config_lib.TrainConfig, steps: int) -> np.ndarray:
    """Train only the log-variances of alpha "auto" with train_lib's optimiser step, on a
    batch whose Dice loss is exactly 0 and whose BCE is log 2; returns (steps, 2) log_vars."""
    from mlssp_jax.losses import total_loss

    ones = jnp.ones((1, 4, 4, 4, 1))
    outputs = {"seg": 30.0 * ones, "cls": jnp.zeros(1)}  # perfect segmentation, p = 0.5
    batch = {"mask": ones, "label": jnp.ones(1)}
    tx = train_lib.create_optimizer(train_cfg, steps_per_epoch=10)
    update = jax.jit(train_lib.make_update_fn(train_cfg, steps_per_epoch=10))
    trainable = {"params": {"w": jnp.zeros(3)}, "log_vars": jnp.zeros(2)}
    opt_state = tx.init(trainable)
    grad_fn = jax.grad(lambda t: total_loss(outputs, batch, "auto", t["log_vars"])[0])
    history = []
    for step in range(steps):
        trainable, opt_state = update(grad_fn(trainable), opt_state, trainable, jnp.int32(step))
        history.append(np.asarray(trainable["log_vars"]))
    return np.array(history)


def test_auto_weights_barely_move_at_the_network_rate():
    cfg = config_lib.TrainConfig(alpha="auto", learning_rate=1e-5)
    history = _auto_weighting_run(cfg, 100)
    assert np.abs(history[-1]).max() < 2e-3  # the problem of issue 16: 'auto' stays fixed


def test_auto_weights_learn_at_their_own_rate_and_stay_bounded():
    cfg = config_lib.TrainConfig(alpha="auto", learning_rate=1e-5, auto_weight_lr=0.05,
                                 log_var_min=-3.0, log_var_max=3.0)
    history = _auto_weighting_run(cfg, 300)
    assert np.isfinite(history).all()
    # Dice is 0: its log-variance runs to the lower bound (weight e^3), never past it
    assert history[:, 0].min() == pytest.approx(-3.0)
    assert history[-1, 0] == pytest.approx(-3.0)
    # BCE is log 2: its log-variance heads to the optimum log(log 2) = -0.37
    assert history[-1, 1] == pytest.approx(np.log(np.log(2.0)), abs=0.1)


def test_fold_class_weights_only_when_configured():
    examples = [{"label": np.float32(v)} for v in (1, 0, 0, 0)]
    off = config_lib.Config()
    assert train_lib.fold_class_weights(off, examples) is None
    on = config_lib.Config(train=config_lib.TrainConfig(class_balance=True))
    np.testing.assert_allclose(train_lib.fold_class_weights(on, examples), [2 / 3, 2.0])
