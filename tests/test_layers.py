"""The conv layers hold flax Conv/ConvTranspose parameters and compute the same thing."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlssp_jax.layers import Conv3x3x3, DownConv, PointConv, UpConv

KEY = jax.random.key(0, impl="rbg")  # rbg: far faster to compile on CPU than threefry
X = jax.random.normal(jax.random.key(1, impl="rbg"), (2, 8, 8, 8, 3))

CASES = [
    (Conv3x3x3(5, conv_impl="xla"), nn.Conv(5, (3, 3, 3), padding="SAME")),
    (DownConv(5, conv_impl="xla"), nn.Conv(5, (2, 2, 2), strides=(2, 2, 2), padding="VALID")),
    (UpConv(5, conv_impl="xla"),
     nn.ConvTranspose(5, (2, 2, 2), strides=(2, 2, 2), padding="SAME")),
    (PointConv(5), nn.Conv(5, (1, 1, 1))),
]


@pytest.mark.parametrize(("layer", "reference"), CASES, ids=lambda c: type(c).__name__)
def test_layer_matches_flax(layer, reference):
    variables = layer.init(KEY, X)
    ref_variables = reference.init(KEY, X)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, ref_variables)
    # a non-zero bias so that the bias path is compared too
    variables = jax.tree.map(lambda p: p + 0.1, variables)
    np.testing.assert_allclose(layer.apply(variables, X), reference.apply(variables, X),
                               rtol=1e-5, atol=1e-5)


def test_he_normal_init_and_zero_bias():
    params = Conv3x3x3(64).init(KEY, jnp.zeros((1, 4, 4, 4, 32)))["params"]
    kernel = np.asarray(params["kernel"])
    assert kernel.shape == (3, 3, 3, 32, 64)
    np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (27 * 32)), rtol=0.03)
    assert not np.any(params["bias"])


def test_bfloat16_compute_float32_params():
    layer = Conv3x3x3(4, dtype=jnp.bfloat16)
    variables = layer.init(KEY, X)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    y = layer.apply(variables, X)
    assert y.dtype == jnp.bfloat16
    y32 = Conv3x3x3(4).apply(variables, X)
    np.testing.assert_allclose(y.astype(jnp.float32), y32, rtol=0.05, atol=0.05)
