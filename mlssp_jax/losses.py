"""The training losses: soft Dice, binary cross-entropy and their (fixed or learned) weighting.

Models output logits; sigmoids are taken here, in float32. ``batch`` dicts are those of
:mod:`mlssp_jax.input_pipeline`: ``mask`` ``(B, S, S, S, 1)`` in {0, 1}, ``label`` ``(B,)``
in {0, 1}, and optionally ``valid`` ``(B,)`` bool (padding rows of the last eval batch are
``False`` and do not count) and ``cls_weight`` ``(B,)`` float (the weight of each sample in
the classification loss; 0 for training VOIs away from the lesion; all ones when absent).

Class-balanced BCE (``train.class_balance``): each sample's BCE is multiplied by its class's
weight from :func:`class_balance_weights`; the batch mean still divides by the number of
counted samples (not by the sum of class weights, which would cancel the weights in a batch
of one class), so over an epoch each class contributes half of the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

Outputs = dict[str, jax.Array | None]


def dice_loss(seg_logits: jax.Array, mask: jax.Array, eps: float = 1.0) -> jax.Array:
    """Soft Dice loss per sample: ``1 - (2 sum(p g) + eps) / (sum p + sum g + eps)``.

    Args:
      seg_logits: (B, D, H, W, 1) logits; ``p = sigmoid(logits)``.
      mask: (B, D, H, W, 1) ground truth ``g`` in {0, 1}.
      eps: smoothing (the paper's eps = 1): an empty mask with an empty prediction gives
        loss 0, and an empty mask with any prediction a loss < 1.

    Returns:
      (B,) float32 losses in [0, 1].
    """
    p = jax.nn.sigmoid(seg_logits.astype(jnp.float32))
    g = mask.astype(jnp.float32)
    axes = tuple(range(1, p.ndim))
    overlap = jnp.sum(p * g, axis=axes)
    total = jnp.sum(p, axis=axes) + jnp.sum(g, axis=axes)
    return 1.0 - (2.0 * overlap + eps) / (total + eps)


def bce_loss(cls_logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Binary cross-entropy from logits, per sample: (B,) logits, (B,) labels -> (B,) nats."""
    return optax.sigmoid_binary_cross_entropy(cls_logits.astype(jnp.float32),
                                              labels.astype(jnp.float32))


def class_balance_weights(labels: np.ndarray) -> np.ndarray:
    """(2,) float32 weights (negative, positive) ``n / (2 n_class)`` from the training labels
    (N,) in {0, 1}: 1 each for balanced classes; (1, 1) if a class is absent."""
    labels = np.asarray(labels).astype(bool)
    counts = np.array([np.count_nonzero(~labels), np.count_nonzero(labels)], dtype=np.float64)
    if counts.min() == 0:
        return np.ones(2, np.float32)
    return (labels.size / (2.0 * counts)).astype(np.float32)


def _batch_mean(per_sample: jax.Array, weights: jax.Array | None) -> jax.Array:
    """Mean over the batch; with (B,) ``weights`` (bool or float >= 0) the weighted mean
    ``sum(w l) / sum(w)``, 0 when every weight is 0."""
    if weights is None:
        return jnp.mean(per_sample)
    weights = weights.astype(jnp.float32)
    total = jnp.sum(weights)
    return jnp.sum(per_sample * weights) / jnp.where(total > 0, total, 1.0)


def batch_dice_loss(seg_logits: jax.Array, mask: jax.Array, weights: jax.Array | None = None,
                    eps: float = 1.0) -> jax.Array:
    """Soft Dice over the whole batch (nnU-Net's ``batch_dice``): one ratio of sums over every
    voxel of every (weighted) sample, so a patch without lesion adds its false positives to
    the denominator instead of being a sample whose only goal is an empty prediction."""
    p = jax.nn.sigmoid(seg_logits.astype(jnp.float32))
    g = mask.astype(jnp.float32)
    w = jnp.ones(p.shape[:1]) if weights is None else weights.astype(jnp.float32)
    w = w.reshape((-1,) + (1,) * (p.ndim - 1))
    overlap = jnp.sum(w * p * g)
    return 1.0 - (2.0 * overlap + eps) / (jnp.sum(w * p) + jnp.sum(w * g) + eps)


def voxel_bce_loss(seg_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean voxel-wise binary cross-entropy per sample: (B, D, H, W, 1) -> (B,) nats."""
    per_voxel = optax.sigmoid_binary_cross_entropy(seg_logits.astype(jnp.float32),
                                                   mask.astype(jnp.float32))
    return jnp.mean(per_voxel, axis=tuple(range(1, per_voxel.ndim)))


def total_loss(outputs: Outputs, batch: dict[str, jax.Array], alpha: float | str,
               log_vars: jax.Array | None = None,
               class_weights: jax.Array | None = None, seg_bce_weight: float = 0.0,
               batch_dice: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training objective and its parts.

    The segmentation loss is the soft Dice, plus ``seg_bce_weight`` times the voxel-wise
    cross-entropy when that is > 0 (nnU-Net's Dice + CE: on patches without lesion the Dice
    alone pulls towards predicting nothing anywhere; the paper: 0). Its parts are reported
    as ``dice`` and ``seg_bce``. ``batch_dice``: the Dice of the whole batch
    (:func:`batch_dice_loss`) instead of the mean of the per-sample Dice (the paper's).

    Both tasks present (``outputs["seg"]`` and ``outputs["cls"]`` not None):

    - ``alpha`` a float: ``alpha * dice + (1 - alpha) * bce`` (the paper's Eq. 3);
    - ``alpha == "auto"`` (Kendall, Gal & Cipolla 2018, homoscedastic uncertainty):
      ``sum_t exp(-s_t) * L_t + s_t`` over t = (dice, bce), with ``s = log_vars`` (2,) the
      learned log variances ``s_t = log sigma_t^2`` (initialise at 0; trained by the train
      step with the model, at ``train.auto_weight_lr`` and clipped to [``train.log_var_min``,
      ``train.log_var_max``], see :func:`mlssp_jax.train_lib.make_update_fn`). This is
      twice Kendall's regression form ``L_t / (2 sigma_t^2) + log sigma_t``; dropping the
      1/2 on both terms keeps the same minimiser ``s_t = log L_t``, i.e. weight
      ``exp(-s_t) = 1 / L_t``, and uses the same form for both tasks (his classification
      form differs only by that factor).

    One task present (``unet3d``, ``cnn``): that task's loss alone, unweighted; ``alpha``
    and ``log_vars`` are then unused.

    ``class_weights`` (2,) (negative, positive), e.g. :func:`class_balance_weights`: the
    class-balanced BCE of the module docstring; None: every sample weighs 1.

    Returns:
      (scalar loss, aux) where aux has ``dice`` and/or ``bce`` (batch means, only for the
      tasks the model has) and, for ``"auto"`` with two tasks, ``weight_dice``,
      ``weight_bce`` (``exp(-s_t)``) and ``log_var_dice``, ``log_var_bce``.
    """
    valid = batch.get("valid")
    aux: dict[str, jax.Array] = {}
    seg_loss = None
    if outputs.get("seg") is not None:
        aux["dice"] = seg_loss = (
            batch_dice_loss(outputs["seg"], batch["mask"], valid) if batch_dice
            else _batch_mean(dice_loss(outputs["seg"], batch["mask"]), valid))
        if seg_bce_weight > 0:
            aux["seg_bce"] = _batch_mean(voxel_bce_loss(outputs["seg"], batch["mask"]), valid)
            seg_loss = aux["dice"] + seg_bce_weight * aux["seg_bce"]
    if outputs.get("cls") is not None:
        weights = batch.get("cls_weight")
        if valid is not None:
            weights = valid if weights is None else weights * valid
        per_sample = bce_loss(outputs["cls"], batch["label"])
        if class_weights is not None:
            class_weights = jnp.asarray(class_weights, jnp.float32)
            per_sample = per_sample * jnp.where(batch["label"] > 0.5, class_weights[1],
                                                class_weights[0])
        aux["bce"] = _batch_mean(per_sample, weights)
    if not aux:
        raise ValueError("outputs has neither 'seg' nor 'cls'")
    if "bce" not in aux or seg_loss is None:
        return (aux["bce"] if seg_loss is None else seg_loss), aux
    if alpha == "auto":
        if log_vars is None:
            raise ValueError("alpha='auto' needs log_vars (2,)")
        parts = jnp.stack([seg_loss, aux["bce"]])
        weights = jnp.exp(-log_vars)
        aux.update(weight_dice=weights[0], weight_bce=weights[1],
                   log_var_dice=log_vars[0], log_var_bce=log_vars[1])
        return jnp.sum(weights * parts + log_vars), aux
    return alpha * seg_loss + (1.0 - alpha) * aux["bce"], aux


__all__ = ["bce_loss", "class_balance_weights", "dice_loss", "total_loss"]
