"""Losses against hand-computed values, empty masks, eps, and the learned weighting."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlssp_jax.losses import (
    batch_dice_loss,
    bce_loss,
    class_balance_weights,
    dice_loss,
    total_loss,
)

BIG = 30.0  # sigmoid(+-30) is 1 / 0 to float32 precision


def _volume(values):
    """(B, 2, 1, 1, 1) logits or masks from a (B, 2) list."""
    return jnp.asarray(values, jnp.float32).reshape(-1, 2, 1, 1, 1)


def test_dice_hand_computed():
    # sample 0: p = (0.5, 0.5), g = (1, 0): 1 - (2*0.5 + 1) / (1 + 1 + 1) = 1/3
    # sample 1: p = (1, 0), g = (1, 0): perfect -> 0
    loss = dice_loss(_volume([[0.0, 0.0], [BIG, -BIG]]), _volume([[1, 0], [1, 0]]))
    np.testing.assert_allclose(loss, [1 / 3, 0.0], atol=1e-6)


def test_dice_empty_masks_and_eps():
    empty = _volume([[0, 0]])
    # empty truth, empty prediction: (0 + eps) / (0 + eps) -> loss 0 for any eps > 0
    np.testing.assert_allclose(dice_loss(_volume([[-BIG, -BIG]]), empty), [0.0], atol=1e-6)
    # empty truth, full prediction: 1 - eps / (2 + eps)
    full = _volume([[BIG, BIG]])
    np.testing.assert_allclose(dice_loss(full, empty, eps=1.0), [1 - 1 / 3], atol=1e-6)
    np.testing.assert_allclose(dice_loss(full, empty, eps=0.5), [1 - 0.5 / 2.5], atol=1e-6)
    # eps = 0 is the plain soft Dice: p = (0.5, 0), g = (1, 0): 1 - 2*0.5 / (0.5 + 1) = 1/3
    np.testing.assert_allclose(dice_loss(_volume([[0.0, -BIG]]), _volume([[1, 0]]), eps=0.0),
                               [1 / 3], atol=1e-6)


def test_bce_hand_computed():
    logits = jnp.array([0.0, 2.0, -1.0])
    labels = jnp.array([1.0, 0.0, 0.0])
    expected = [np.log(2.0), np.log1p(np.exp(2.0)), np.log1p(np.exp(-1.0))]
    np.testing.assert_allclose(bce_loss(logits, labels), expected, rtol=1e-6)


@pytest.fixture()
def case():
    outputs = {"seg": _volume([[0.0, 0.0], [BIG, -BIG]]), "cls": jnp.array([0.0, 2.0])}
    batch = {"mask": _volume([[1, 0], [1, 0]]), "label": jnp.array([1.0, 0.0])}
    dice = (1 / 3 + 0.0) / 2
    bce = (np.log(2.0) + np.log1p(np.exp(2.0))) / 2
    return outputs, batch, dice, bce


def test_total_fixed_alpha(case):
    outputs, batch, dice, bce = case
    loss, aux = total_loss(outputs, batch, alpha=0.4)
    np.testing.assert_allclose(loss, 0.4 * dice + 0.6 * bce, rtol=1e-6)
    np.testing.assert_allclose([aux["dice"], aux["bce"]], [dice, bce], rtol=1e-6)


def test_total_single_task_models(case):
    outputs, batch, dice, bce = case
    loss, aux = total_loss({"seg": outputs["seg"], "cls": None}, batch, alpha=0.4)
    np.testing.assert_allclose(loss, dice, rtol=1e-6)
    assert set(aux) == {"dice"}
    loss, aux = total_loss({"seg": None, "cls": outputs["cls"]}, batch, alpha="auto",
                           log_vars=jnp.zeros(2))
    np.testing.assert_allclose(loss, bce, rtol=1e-6)
    assert set(aux) == {"bce"}


def test_total_valid_rows_only(case):
    outputs, batch, _, _ = case
    _, aux = total_loss(outputs, {**batch, "valid": jnp.array([True, False])}, alpha=0.5)
    np.testing.assert_allclose([aux["dice"], aux["bce"]], [1 / 3, np.log(2.0)], rtol=1e-6)


def test_total_cls_weight_masks_bce_only():
    # BCE of (logit, label): (0, 1) -> log 2, (2, 0) -> log(1 + e^2), (-1, 0) -> log(1 + e^-1)
    outputs = {"seg": _volume([[0.0, 0.0], [BIG, -BIG], [BIG, -BIG]]),
               "cls": jnp.array([0.0, 2.0, -1.0])}
    batch = {"mask": _volume([[1, 0], [1, 0], [1, 0]]), "label": jnp.array([1.0, 0.0, 0.0])}
    weighted = {**batch, "cls_weight": jnp.array([1.0, 0.0, 1.0])}
    _, aux = total_loss(outputs, weighted, alpha=0.4)
    # BCE over samples 0 and 2 only; Dice still over all three: (1/3 + 0 + 0) / 3
    np.testing.assert_allclose(aux["bce"], (np.log(2.0) + np.log1p(np.exp(-1.0))) / 2, rtol=1e-6)
    np.testing.assert_allclose(aux["dice"], 1 / 9, rtol=1e-6)
    # combined with valid: sample 2 is padding -> BCE of sample 0 alone, Dice of samples 0, 1
    _, aux = total_loss(outputs, {**weighted, "valid": jnp.array([True, True, False])}, alpha=0.4)
    np.testing.assert_allclose([aux["bce"], aux["dice"]], [np.log(2.0), 1 / 6], rtol=1e-6)
    # every weight 0: BCE 0 (no NaN) and no gradient through the classification logits
    none = {**batch, "cls_weight": jnp.zeros(3)}
    assert float(total_loss(outputs, none, alpha=0.4)[1]["bce"]) == 0.0
    grad = jax.grad(lambda c: total_loss({**outputs, "cls": c}, none, alpha=0.4)[0])
    np.testing.assert_array_equal(grad(outputs["cls"]), np.zeros(3))
    # all ones is the same as no weights
    ones = total_loss(outputs, {**batch, "cls_weight": jnp.ones(3)}, alpha=0.4)[0]
    np.testing.assert_allclose(ones, total_loss(outputs, batch, alpha=0.4)[0], rtol=1e-6)


def test_total_auto_weighting(case):
    outputs, batch, dice, bce = case
    log_vars = jnp.array([0.5, -1.0])
    loss, aux = total_loss(outputs, batch, alpha="auto", log_vars=log_vars)
    expected = np.exp(-0.5) * dice + 0.5 + np.exp(1.0) * bce - 1.0
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose([aux["weight_dice"], aux["weight_bce"]],
                               [np.exp(-0.5), np.exp(1.0)], rtol=1e-6)
    # at zero init the weights are 1 and the optimum of s_t is log L_t (zero gradient there)
    grad = jax.grad(lambda s: total_loss(outputs, batch, "auto", s)[0])
    np.testing.assert_allclose(grad(jnp.zeros(2)), [1 - dice, 1 - bce], rtol=1e-5)
    np.testing.assert_allclose(grad(jnp.log(jnp.array([dice, bce]))), [0.0, 0.0], atol=1e-5)
    with pytest.raises(ValueError, match="log_vars"):
        total_loss(outputs, batch, alpha="auto")


def test_class_balance_weights():
    # 1 positive, 3 negatives: n / (2 n_c) = 4 / 6 and 4 / 2
    np.testing.assert_allclose(class_balance_weights(np.array([1, 0, 0, 0])), [2 / 3, 2.0])
    np.testing.assert_allclose(class_balance_weights(np.array([1, 0, 1, 0])), [1.0, 1.0])
    np.testing.assert_allclose(class_balance_weights(np.array([0, 0])), [1.0, 1.0])


def test_total_class_balanced_bce(case):
    outputs, batch, dice, _ = case  # sample 0 positive (BCE log 2), sample 1 negative
    bce_pos, bce_neg = np.log(2.0), np.log1p(np.exp(2.0))
    weights = jnp.array([0.5, 3.0])
    _, aux = total_loss(outputs, batch, alpha=0.4, class_weights=weights)
    np.testing.assert_allclose(aux["bce"], (3.0 * bce_pos + 0.5 * bce_neg) / 2, rtol=1e-6)
    np.testing.assert_allclose(aux["dice"], dice, rtol=1e-6)  # segmentation untouched
    # a batch of one class keeps its weight (the mean divides by the sample count)
    positive_only = {**batch, "valid": jnp.array([True, False])}
    _, aux = total_loss(outputs, positive_only, alpha=0.4, class_weights=weights)
    np.testing.assert_allclose(aux["bce"], 3.0 * bce_pos, rtol=1e-6)
    ones = total_loss(outputs, batch, alpha=0.4, class_weights=jnp.ones(2))[0]
    np.testing.assert_allclose(ones, total_loss(outputs, batch, alpha=0.4)[0], rtol=1e-6)


def test_seg_bce_weight_adds_the_voxel_cross_entropy_to_the_dice():
    logits = jnp.zeros((2, 4, 4, 4, 1))  # p = 0.5 everywhere: BCE ln 2 per voxel
    mask = jnp.zeros((2, 4, 4, 4, 1)).at[0, :2].set(1.0)
    batch = {"mask": mask, "label": jnp.array([1.0, 0.0])}
    outputs = {"seg": logits, "cls": None}
    dice_only, aux0 = total_loss(outputs, batch, 0.4)
    both, aux = total_loss(outputs, batch, 0.4, seg_bce_weight=2.0)
    assert "seg_bce" not in aux0 and float(aux["seg_bce"]) == pytest.approx(np.log(2), rel=1e-5)
    assert float(both) == pytest.approx(float(dice_only) + 2.0 * np.log(2), rel=1e-5)
    outputs["cls"] = jnp.zeros((2,))
    mixed, aux = total_loss(outputs, batch, 0.4, seg_bce_weight=1.0)
    expected = 0.4 * (aux["dice"] + aux["seg_bce"]) + 0.6 * aux["bce"]
    assert float(mixed) == pytest.approx(float(expected), rel=1e-6)


def test_batch_dice_pools_the_batch_so_an_empty_patch_only_adds_false_positives():
    big = 20.0  # logit: p ~ 1
    mask = jnp.zeros((2, 4, 4, 4, 1)).at[0, :2].set(1.0)  # 32 lesion voxels in sample 0
    logits = jnp.where(mask > 0, big, -big).at[1, 0, 0, :2].set(big)  # 2 FP voxels in sample 1
    per_sample = dice_loss(logits, mask)
    assert float(per_sample[1]) == pytest.approx(1 - 1 / 3, abs=1e-4)  # empty: goal "nothing"
    pooled = batch_dice_loss(logits, mask)
    assert float(pooled) == pytest.approx(1 - (2 * 32 + 1) / (34 + 32 + 1), abs=1e-4)
    only_first = batch_dice_loss(logits, mask, jnp.array([1.0, 0.0]))
    assert float(only_first) == pytest.approx(0.0, abs=1e-4)
    loss, aux = total_loss({"seg": logits, "cls": None}, {"mask": mask}, 0.4, batch_dice=True)
    assert float(aux["dice"]) == pytest.approx(float(pooled))
