"""Model family: shapes of every variant, branch point routing, gradient flow, bf16, remat."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlssp_jax.config import MODEL_NAMES, ModelConfig
from mlssp_jax.errors import InputError
from mlssp_jax.models import (
    DECODER,
    POOL_FLOOR,
    build_model,
    has_tasks,
    init_params,
    lesion_rim_pool,
)

KEY = jax.random.key(0, impl="rbg")  # rbg: far faster to compile on CPU than threefry
WIDTH = 4
TINY = ModelConfig(name="mlssp", width=WIDTH, dense_units=8)


def _shapes(cfg: ModelConfig, x_shape):
    """(output shapes, param shapes) without compiling anything (abstract evaluation)."""
    model = build_model(cfg)
    out, variables = jax.eval_shape(model.init_with_output, KEY, jnp.zeros(x_shape))
    return out, variables["params"]


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("size", [16, 32, 48])
def test_output_shapes(name, size):
    out, _ = _shapes(dataclasses.replace(TINY, name=name), (2, size, size, size, 1))
    seg, cls = has_tasks(name)
    assert (out["seg"] is not None, out["cls"] is not None) == (seg, cls)
    if seg:
        assert out["seg"].shape == (2, size, size, size, 1)
        assert out["seg"].dtype == jnp.float32
    if cls:
        assert out["cls"].shape == (2,)
        assert out["cls"].dtype == jnp.float32


@pytest.mark.parametrize("depth", range(5))
def test_share_depth_moves_the_branch_point(depth):
    out, params = _shapes(dataclasses.replace(TINY, share_depth=depth), (1, 32, 32, 32, 1))
    tap_channels = WIDTH * 2 ** max(depth - 1, 0)
    assert params["cls_head"]["conv0"]["kernel"].shape == (3, 3, 3, tap_channels, 2 * WIDTH)
    assert out["cls"].shape == (1,) and out["seg"].shape == (1, 32, 32, 32, 1)


def test_variant_defaults():
    depth = {name: build_model(dataclasses.replace(TINY, name=name)).share_depth
             for name in ("mlssp", "ynet", "he")}
    assert depth == {"mlssp": 0, "ynet": 4, "he": DECODER}
    _, params = _shapes(dataclasses.replace(TINY, name="cnn"), (1, 16, 16, 16, 1))
    assert set(params) == {"stem", "cls_head"}
    _, params = _shapes(dataclasses.replace(TINY, name="unet3d"), (1, 16, 16, 16, 1))
    assert set(params) == {"stem", "unet"}


def test_bad_configs_raise():
    with pytest.raises(InputError, match="model.share_depth"):
        build_model(dataclasses.replace(TINY, name="he", share_depth=2))
    with pytest.raises(InputError, match="model.name"):
        build_model(dataclasses.replace(TINY, name="vnet"))
    with pytest.raises(ValueError, match="divisible by 16"):
        _shapes(TINY, (1, 24, 24, 24, 1))
    with pytest.raises(AssertionError):  # chex: one input channel
        _shapes(TINY, (1, 16, 16, 16, 2))


def _random_params(model, x, seed=0):
    """He-scaled random params (and non-zero biases) without compiling the initialisers."""
    shapes = jax.eval_shape(model.init, KEY, x)["params"]
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 100
        return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape), jnp.float32)

    return jax.tree.map(draw, shapes)


def _task_grads(model, params, x):
    """Outputs, and gradients of a seg-only and a cls-only loss w.r.t. all params."""
    def losses(p):
        out = model.apply({"params": p}, x)
        return (jnp.mean(out["seg"] ** 2), jnp.mean(out["cls"] ** 2)), out

    _, vjp, out = jax.vjp(losses, params, has_aux=True)
    return out, vjp((1.0, 0.0))[0], vjp((0.0, 1.0))[0]


@pytest.fixture(scope="module")
def mlssp():
    """A width-4 mlssp model, params, a 16^3 batch of 2, its outputs and task gradients."""
    model = build_model(TINY)
    x = jax.random.uniform(jax.random.key(1, impl="rbg"), (2, 16, 16, 16, 1))
    params = _random_params(model, x)
    out, seg_grads, cls_grads = jax.jit(lambda p: _task_grads(model, p, x))(params)
    return {"params": params, "x": x, "out": out, "seg_grads": seg_grads, "cls_grads": cls_grads}


def _norms(tree):
    return {k: sum(float(np.abs(np.asarray(g)).sum()) for g in jax.tree.leaves(v))
            for k, v in tree.items()}


def test_gradient_flow_mlssp(mlssp):
    seg, cls = _norms(mlssp["seg_grads"]), _norms(mlssp["cls_grads"])
    assert seg["stem"] > 0 and cls["stem"] > 0  # the shared stem learns from both heads
    assert seg["unet"] > 0 and cls["cls_head"] > 0
    assert seg["cls_head"] == 0 and cls["unet"] == 0  # the branches are separate


def test_bfloat16_close_to_float32(mlssp):
    model16 = build_model(dataclasses.replace(TINY, dtype="bfloat16"))
    out16 = jax.jit(model16.apply)({"params": mlssp["params"]}, mlssp["x"])
    for key in ("seg", "cls"):
        chex.assert_type(out16[key], jnp.float32)
        ref = mlssp["out"][key]
        scale = float(jnp.max(jnp.abs(ref)))
        assert scale > 0
        np.testing.assert_allclose(out16[key], ref, atol=0.05 * scale)


def test_remat_same_gradients(mlssp):
    remat = build_model(dataclasses.replace(TINY, remat=True))

    def loss(p):
        out = remat.apply({"params": p}, mlssp["x"])
        return jnp.mean(out["seg"] ** 2) + jnp.mean(out["cls"] ** 2)

    # stem, 4 encoder levels, bottom and 4 decoder levels are rematerialised
    assert str(jax.make_jaxpr(loss)(mlssp["params"])).count("remat") == 10
    grads = jax.jit(jax.grad(loss))(mlssp["params"])
    # the gradient of the summed loss is the sum of the two task gradients
    expected = jax.tree.map(np.add, mlssp["seg_grads"], mlssp["cls_grads"])
    chex.assert_trees_all_close(grads, expected, rtol=1e-5, atol=1e-7)


def test_host_init_params_match_flax_init_structure_and_scale():
    model = build_model(ModelConfig(name="mlssp", width=4))
    params = init_params(model, 16, seed=3)
    reference = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 16, 1)))
    assert jax.tree.structure(params) == jax.tree.structure(reference["params"])
    for (path, leaf), ref in zip(jax.tree_util.tree_leaves_with_path(params),
                                 jax.tree.leaves(reference["params"]), strict=True):
        assert leaf.shape == ref.shape and leaf.dtype == np.float32
        if jax.tree_util.keystr(path).endswith("['bias']"):
            assert not leaf.any()
    kernel = params["unet"]["bottom"]["conv0"]["kernel"]  # (3, 3, 3, 32, 64): 27,648 draws
    fan_in = np.prod(kernel.shape[:-1])
    assert abs(kernel.std() - np.sqrt(2.0 / fan_in)) < 0.03 * np.sqrt(2.0 / fan_in)
    assert np.abs(kernel).max() <= 2.0 * np.sqrt(2.0 / fan_in) / 0.87962566 + 1e-6
    again = init_params(model, 16, seed=3)
    other = init_params(model, 16, seed=4)
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True)
    assert all(np.array_equal(a, b) for a, b in pairs)
    assert not np.array_equal(kernel, other["unet"]["bottom"]["conv0"]["kernel"])


LESION = dataclasses.replace(TINY, cls_pooling="lesion", cls_rim_voxels=1)


@pytest.mark.parametrize("name", ["mlssp", "ynet", "he"])
def test_lesion_pooling_shapes(name):
    out, params = _shapes(dataclasses.replace(LESION, name=name), (2, 32, 32, 32, 1))
    assert out["cls"].shape == (2,) and out["seg"].shape == (2, 32, 32, 32, 1)
    # lesion and rim means of the 4w features feed the first dense layer
    assert params["cls_head"]["dense0"]["kernel"].shape == (8 * WIDTH, 8)


def test_global_pooling_is_the_default_and_unchanged():
    assert ModelConfig().cls_pooling == "global"
    out, params = _shapes(TINY, (2, 16, 16, 16, 1))
    assert params["cls_head"]["dense0"]["kernel"].shape == (4 * WIDTH, 8)
    _, explicit = _shapes(dataclasses.replace(TINY, cls_pooling="global"), (2, 16, 16, 16, 1))
    assert jax.tree.structure(explicit) == jax.tree.structure(params)
    # the CNN alone has no lesion to pool over: global, so one config serves every baseline
    _, cnn = _shapes(dataclasses.replace(LESION, name="cnn"), (2, 16, 16, 16, 1))
    assert cnn["cls_head"]["dense0"]["kernel"].shape == (4 * WIDTH, 8)


def test_lesion_rim_pool_weights_lesion_then_rim():
    x = jnp.arange(4 * 4 * 4, dtype=jnp.float32).reshape(1, 4, 4, 4, 1)  # (1, 4, 4, 4, 1)
    prob = jnp.zeros((1, 8, 8, 8, 1)).at[0, 2:4, 2:4, 2:4, 0].set(1.0)  # feature voxel (1, 1, 1)
    pooled = np.asarray(lesion_rim_pool(x, prob, rim_voxels=1))  # (1, 2)
    values = np.asarray(x[0, ..., 0])
    lesion = np.zeros((4, 4, 4))
    lesion[1, 1, 1] = 1.0
    rim = np.zeros((4, 4, 4))
    rim[0:3, 0:3, 0:3] = 1.0
    rim[1, 1, 1] = 0.0  # the 26 neighbours
    for half, weights in enumerate((lesion, rim)):
        weights = weights + POOL_FLOOR
        assert pooled[0, half] == pytest.approx((weights * values).sum() / weights.sum(),
                                                rel=1e-5)
    # no lesion predicted: both halves fall back to the global mean
    empty = np.asarray(lesion_rim_pool(x, jnp.zeros_like(prob), rim_voxels=1))
    np.testing.assert_allclose(empty, [[x.mean(), x.mean()]], rtol=1e-5)


def test_lesion_pooling_does_not_train_the_segmentation_through_the_classifier():
    model = build_model(LESION)
    x = jax.random.uniform(jax.random.key(1, impl="rbg"), (2, 16, 16, 16, 1))
    params = _random_params(model, x)
    _, seg_grads, cls_grads = jax.jit(lambda p: _task_grads(model, p, x))(params)
    cls = _norms(cls_grads)
    assert cls["cls_head"] > 0 and cls["stem"] > 0
    assert cls["unet"] == 0  # the probability guides the pooling with its gradient stopped
