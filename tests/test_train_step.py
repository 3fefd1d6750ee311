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


def test_moving_average_warms_up_then_uses_its_decay():
    ema, params = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
    first = train_step.ema_update(ema, params, 0.99, jnp.int32(1))  # d = 2 / 11
    np.testing.assert_allclose(first["w"], 1 - 2 / 11, rtol=1e-6)
    late = train_step.ema_update(ema, params, 0.99, jnp.int32(10_000))  # d = 0.99
    np.testing.assert_allclose(late["w"], 0.01, rtol=1e-4)


def test_train_step_keeps_a_moving_average_only_when_configured():
    from mlssp_jax import parallel

    base = {"data": {"voi_size": 16}, "model": {"width": 4, "dense_units": 8},
            "train": {"batch_size": 2, "learning_rate": 1e-2}}
    rng = np.random.default_rng(0)
    batch = {"image": rng.random((2, 16, 16, 16, 1), dtype=np.float32),
             "mask": (rng.random((2, 16, 16, 16, 1)) > 0.7).astype(np.float32),
             "label": np.array([0, 1], np.float32)}
    mesh = parallel.make_mesh()
    off = config_lib.from_dict(base)
    assert train_step.create_train_state(off, jax.random.key(0), mesh, 1).ema_params is None
    on = config_lib.from_dict({**base, "train": {**base["train"], "ema_decay": 0.5}})
    state = train_step.create_train_state(on, jax.random.key(0), mesh, 1)
    init = np.asarray(state.params["stem"]["conv0"]["kernel"])
    step = train_step.make_train_step(on, mesh, 1)
    state, _ = step(state, parallel.shard_batch(batch, mesh))
    online = np.asarray(state.params["stem"]["conv0"]["kernel"])
    averaged = np.asarray(train_step.eval_params(state)["stem"]["conv0"]["kernel"])
    d = 2 / 11  # the warm-up's decay at step 1
    assert np.abs(online - init).max() > 1e-3
    np.testing.assert_allclose(averaged, d * init + (1 - d) * online, rtol=1e-5, atol=1e-7)


def test_fold_class_weights_only_when_configured():
    examples = [{"label": np.float32(v)} for v in (1, 0, 0, 0)]
    off = config_lib.Config()
    assert train_step.fold_class_weights(off, examples) is None
    on = config_lib.Config(train=config_lib.TrainConfig(class_balance=True))
    np.testing.assert_allclose(train_step.fold_class_weights(on, examples), [2 / 3, 2.0])
