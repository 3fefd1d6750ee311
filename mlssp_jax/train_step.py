"""The training state and the jitted step functions: optimiser, loss, train step, predict.

Arrays are channels-last: images and masks ``(B, S, S, S, 1)``, labels ``(B,)``. The train
step runs data-parallel over every device of every host (:mod:`mlssp_jax.parallel`). The
learning rate is Adam's, decayed by ``train.lr_decay_per_epoch`` after every epoch (after an
optional linear warm-up, ``train.warmup_epochs``); ``train.grad_clip_norm`` clips the
gradient's global norm before Adam.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from mlssp_jax import config as config_lib
from mlssp_jax import losses, models, parallel

# ``(params, images (B, S, S, S, 1)) -> {"seg_prob", "cls_prob"}``: a model's jitted forward
# pass with the parameters as an argument (bind them for :data:`mlssp_jax.inference.PredictFn`).
ApplyFn = Callable[[Any, jax.Array], dict]


@struct.dataclass
class TrainState:
    """Everything that changes during training (all replicated over the mesh)."""

    step: jax.Array  # () int32, optimiser steps taken
    params: Any  # the model's flax "params" collection
    log_vars: jax.Array  # (2,) learned log-variances (seg, cls) when alpha is "auto", else unused
    opt_state: optax.OptState
    ema_params: Any = None  # the parameters' moving average (train.ema_decay > 0), else None


def eval_params(state: TrainState) -> Any:
    """The parameters a state is evaluated and saved with: the moving average when kept."""
    return state.params if state.ema_params is None else state.ema_params


def ema_update(ema: Any, params: Any, decay: float, step: jax.Array) -> Any:
    """``ema * d + params * (1 - d)`` with ``d = min(decay, (1 + step) / (10 + step))``:
    the warm-up keeps the first steps' average from being held at the initialisation
    (``step``: the optimiser steps taken, counting this one)."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: e * d + p * (1.0 - d), ema, params)


def create_learning_rate_fn(train_cfg: config_lib.TrainConfig,
                            steps_per_epoch: int) -> optax.Schedule:
    """lr(step) = learning_rate * (1 - lr_decay_per_epoch) ** (step // steps_per_epoch),
    times ``min(1, (step + 1) / (warmup_epochs * steps_per_epoch))`` with a warm-up (the
    decay counts epochs from the first step either way)."""
    decayed = optax.exponential_decay(
        init_value=train_cfg.learning_rate, transition_steps=steps_per_epoch,
        decay_rate=1.0 - train_cfg.lr_decay_per_epoch, staircase=True)
    warmup_steps = train_cfg.warmup_epochs * steps_per_epoch
    if warmup_steps == 0:
        return decayed

    def schedule(step: jax.Array) -> jax.Array:
        return decayed(step) * jnp.minimum(1.0, (step + 1.0) / warmup_steps)

    return schedule


def create_optimizer(train_cfg: config_lib.TrainConfig,
                     steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam (b1, b2 from the config) on the learning-rate schedule, after clipping the
    gradient's global norm to ``grad_clip_norm`` when that is > 0 (the optimiser state then
    holds the clip's empty state before Adam's)."""
    adam = optax.adam(create_learning_rate_fn(train_cfg, steps_per_epoch),
                      b1=train_cfg.adam_b1, b2=train_cfg.adam_b2)
    if train_cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip_norm), adam)
    return adam


def make_update_fn(train_cfg: config_lib.TrainConfig, steps_per_epoch: int) -> Callable:
    """``(grads, opt_state, trainable, step) -> (trainable, opt_state)``: one optimiser step.

    ``trainable`` is ``{"params", "log_vars"}``. One Adam over both (its state keeps the
    structure of earlier runs' checkpoints); with ``train.auto_weight_lr`` > 0 the
    log-variances' update is rescaled from the network's rate ``lr(step)`` to that constant
    rate, which is exactly a separate Adam at that rate (Adam's moments are per parameter).
    The log-variances are then clipped to [``log_var_min``, ``log_var_max``].
    """
    tx = create_optimizer(train_cfg, steps_per_epoch)
    lr_fn = create_learning_rate_fn(train_cfg, steps_per_epoch)

    def update(grads: dict, opt_state: optax.OptState, trainable: dict,
               step: jax.Array) -> tuple[dict, optax.OptState]:
        updates, opt_state = tx.update(grads, opt_state, trainable)
        if train_cfg.auto_weight_lr > 0:
            scale = train_cfg.auto_weight_lr / lr_fn(step)
            updates = {**updates, "log_vars": updates["log_vars"] * scale}
        trainable = optax.apply_updates(trainable, updates)
        log_vars = jnp.clip(trainable["log_vars"], train_cfg.log_var_min, train_cfg.log_var_max)
        return {**trainable, "log_vars": log_vars}, opt_state

    return update


def _trainable(state: TrainState) -> dict:
    return {"params": state.params, "log_vars": state.log_vars}


def create_train_state(config: config_lib.Config, rng: jax.Array, mesh: Mesh,
                       steps_per_epoch: int) -> TrainState:
    """He-initialised parameters, zero log-variances and a fresh Adam state (and the
    parameters' moving average, starting at them, with ``train.ema_decay``), replicated on ``mesh``.

    Every host computes the same values from ``rng``; ``steps_per_epoch`` only sets the
    learning-rate schedule, which does not change the state's structure.
    """
    model = models.build_model(config.model)
    tx = create_optimizer(config.train, steps_per_epoch)
    size = config.data.voi_size

    def init(params: dict) -> TrainState:
        log_vars = jnp.zeros((2,), jnp.float32)
        opt_state = tx.init({"params": params, "log_vars": log_vars})
        ema = jax.tree.map(jnp.copy, params) if config.train.ema_decay > 0 else None
        return TrainState(jnp.zeros((), jnp.int32), params, log_vars, opt_state, ema)

    # Host-side init (models.init_params): XLA's RNG compile took minutes on CPU.
    seed = zlib.crc32(np.asarray(jax.random.key_data(rng)).tobytes())
    params = models.init_params(model, size, seed)
    return jax.jit(init, out_shardings=parallel.replicated(mesh))(params)


def make_loss_fn(config: config_lib.Config, class_weights: np.ndarray | None = None) -> Callable:
    """``(trainable, batch) -> (loss, parts)``: the weighted task losses on one batch.

    ``class_weights`` (2,): the class-balanced BCE's weights (:func:`fold_class_weights`).
    """
    model = models.build_model(config.model)
    alpha = config.train.alpha

    def loss_fn(trainable: dict, batch: dict) -> tuple[jax.Array, dict]:
        outputs = model.apply({"params": trainable["params"]}, batch["image"])
        log_vars = trainable["log_vars"] if alpha == "auto" else None
        return losses.total_loss(outputs, batch, alpha, log_vars, class_weights,
                                 seg_bce_weight=config.train.seg_bce_weight,
                                 batch_dice=config.train.batch_dice)

    return loss_fn


def make_train_step(config: config_lib.Config, mesh: Mesh, steps_per_epoch: int,
                    class_weights: np.ndarray | None = None) -> Callable:
    """A jitted ``(state, batch) -> (state, metrics)``; the state's buffers are donated.
    With ``train.ema_decay`` the parameters' moving average is updated after each step.

    ``batch``: ``image``/``mask`` ``(B, S, S, S, 1)`` and ``label`` ``(B,)``, sharded along
    the batch. ``metrics``: ``loss``, the per-task losses and ``lr`` (the rate of this step).
    ``class_weights``: see :func:`make_loss_fn`.
    """
    loss_fn = make_loss_fn(config, class_weights)
    update = make_update_fn(config.train, steps_per_epoch)
    lr_fn = create_learning_rate_fn(config.train, steps_per_epoch)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        trainable = _trainable(state)
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, batch)
        trainable, opt_state = update(grads, state.opt_state, trainable, state.step)
        step = state.step + 1
        ema = (None if state.ema_params is None else
               ema_update(state.ema_params, trainable["params"], config.train.ema_decay, step))
        new_state = state.replace(step=step, params=trainable["params"],
                                  log_vars=trainable["log_vars"], opt_state=opt_state,
                                  ema_params=ema)
        return new_state, {**parts, "loss": loss, "lr": lr_fn(state.step)}

    return jax.jit(train_step, donate_argnums=0,
                   in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                   out_shardings=parallel.replicated(mesh))


def fold_class_weights(config: config_lib.Config, train_examples: list[dict]) -> np.ndarray | None:
    """The class-balanced BCE's (2,) weights from the training fold's labels, or None when
    ``train.class_balance`` is off."""
    if not config.train.class_balance:
        return None
    return losses.class_balance_weights(np.array([e["label"] for e in train_examples]))


def make_predict_fn(config: config_lib.Config, mesh: Mesh | None = None) -> ApplyFn:
    """A jitted ``(params, images (B, S, S, S, 1)) -> {"seg_prob": (B, S, S, S, 1) | None,
    "cls_prob": (B,) | None}`` (sigmoid probabilities; None for a task the model lacks).

    With a ``mesh`` the images are sharded along the batch and the outputs replicated, so
    every host can read them.
    """
    model = models.build_model(config.model)

    def predict(params: Any, images: jax.Array) -> dict:
        out = model.apply({"params": params}, images)
        return {"seg_prob": None if out["seg"] is None else jax.nn.sigmoid(out["seg"]),
                "cls_prob": None if out["cls"] is None else jax.nn.sigmoid(out["cls"])}

    if mesh is None:
        return jax.jit(predict)
    return jax.jit(predict, in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                   out_shardings=parallel.replicated(mesh))
