"""The optimiser step of train_step without a model: the learned task weighting's own rate
and bounds, and the class-balanced BCE's weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlssp_jax import config as config_lib
from mlssp_jax import train_step
from mlssp_jax.losses import total_loss


def _auto_weighting_run(train_cfg: config_lib.TrainConfig, steps: int) -> np.ndarray:
    """Train only the log-variances of alpha "auto" with train_step.s optimiser step, on a
    batch whose Dice loss is exactly 0 and whose BCE is log 2; returns (steps, 2) log_vars."""
    ones = jnp.ones((1, 4, 4, 4, 1))
    outputs = {"seg": 30.0 * ones, "cls": jnp.zeros(1)}  # perfect segmentation, p = 0.5
    batch = {"mask": ones, "label": jnp.ones(1)}
    tx = train_step.create_optimizer(train_cfg, steps_per_epoch=10)
    update = jax.jit(train_step.make_update_fn(train_cfg, steps_per_epoch=10))
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
    assert train_step.fold_class_weights(off, examples) is None
    on = config_lib.Config(train=config_lib.TrainConfig(class_balance=True))
    np.testing.assert_allclose(train_step.fold_class_weights(on, examples), [2 / 3, 2.0])
