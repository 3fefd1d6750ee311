"""The CPU convolution path equals XLA's native convolution, values and gradients.

Every layer shape of the network at small sizes: the 1-channel stem, C -> C and
2C -> C convs at each level (16^3 .. 2^3, so each formulation is exercised), the
2x2x2 down and up convs, odd channel counts, batch 1 and 2, non-cubic volumes.
Gradients are compared by global relative L2 (PERF_NOTES.md: element-wise maxima
mislead in float32).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlssp_jax import conv_ops, cpu_env

TOLERANCE = 1e-5  # relative L2, float32

# (batch, (D, H, W), Cin, Cout)
CONV3D_CASES = [
    (2, (16, 16, 16), 1, 3),   # stem
    (1, (16, 16, 16), 1, 5),
    (2, (16, 16, 16), 3, 3),   # level 0: C -> C
    (1, (16, 16, 16), 6, 3),   # level 0: 2C -> C (decoder)
    (2, (8, 8, 8), 5, 5),
    (1, (8, 8, 8), 10, 5),
    (2, (4, 4, 4), 5, 5),
    (1, (4, 4, 4), 10, 5),
    (2, (2, 2, 2), 7, 7),
    (1, (2, 2, 2), 14, 7),
    (1, (32, 32, 32), 3, 2),   # >= 32^3: single-conv weight gradient
    (1, (6, 10, 4), 3, 5),     # non-cubic
]
DOWN_CASES = [(2, (16, 16, 16), 3, 6), (1, (8, 8, 8), 5, 10), (2, (4, 4, 4), 7, 14),
              (1, (6, 10, 4), 3, 5)]
UP_CASES = [(2, (8, 8, 8), 6, 3), (1, (2, 2, 2), 14, 7), (2, (4, 4, 4), 5, 3),
            (1, (3, 5, 2), 3, 5)]


def _inputs(batch, spatial, cin, cout, ksize, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, *spatial, cin)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(ksize,) * 3 + (cin, cout)) / np.sqrt(cin * ksize**3),
                         jnp.float32)
    return x, kernel


def _value_and_grads(op, x, kernel, impl):
    """op's output and the gradients w.r.t. x and kernel of a fixed random projection of it."""

    def loss(x, kernel):
        y = op(x, kernel, impl)
        weights = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        return jnp.sum(y * weights), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, kernel)
    return y, *grads


def _relative_l2(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _assert_cpu_equals_xla(op, x, kernel):
    expected = _value_and_grads(op, x, kernel, "xla")
    actual = _value_and_grads(op, x, kernel, "cpu")
    for name, a, e in zip(("output", "d_input", "d_kernel"), actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert _relative_l2(a, e) < TOLERANCE, (name, _relative_l2(a, e))


@pytest.mark.parametrize(("batch", "spatial", "cin", "cout"), CONV3D_CASES)
def test_conv3d_cpu_equals_xla(batch, spatial, cin, cout):
    x, kernel = _inputs(batch, spatial, cin, cout, 3)
    _assert_cpu_equals_xla(conv_ops.conv3d, x, kernel)


# Every formulation on shapes where conv3d itself would pick another one.
FORMULATION_CASES = [
    ("im2col", (2, (4, 4, 4), 5, 3)),
    ("im2col", (1, (8, 6, 8), 10, 5)),
    ("depth_split", (2, (8, 8, 8), 5, 5)),
    ("depth_split", (1, (4, 4, 4), 1, 5)),   # taps in the input channels
    ("split_wgrad", (1, (8, 8, 8), 6, 3)),
    ("concat_wgrad", (2, (8, 8, 8), 5, 5)),
    ("concat_wgrad", (1, (6, 10, 4), 1, 3)),
]


@pytest.mark.parametrize(("name", "case"), FORMULATION_CASES)
def test_each_formulation_equals_xla(name, case):
    x, kernel = _inputs(*case, 3)
    formulation = conv_ops.FORMULATIONS[name]

    def op(x, kernel, impl):
        return formulation(x, kernel) if impl == "cpu" else conv_ops.conv3d(x, kernel, "xla")

    _assert_cpu_equals_xla(op, x, kernel)


def test_formulation_choice_by_size():
    """Small layers keep XLA's conv; wide layers at 8^3/4^3 and every layer >= 16^3 do not."""
    pick = conv_ops.conv3d_formulation
    assert pick((2, 8, 8, 8, 64), 64) == "native"        # width 8 at 8^3
    assert pick((2, 4, 4, 4, 16), 16) == "native"
    assert pick((2, 8, 8, 8, 128), 128) == "depth_split"  # width 16 at 8^3
    assert pick((2, 4, 4, 4, 256), 256) == "im2col"       # width 16 at 4^3
    assert pick((4, 16, 16, 16, 4), 4) == "split_wgrad"   # any width at 16^3
    assert pick((2, 64, 64, 64, 1), 16) == "concat_wgrad"


@pytest.mark.parametrize("spatial", [(8, 8, 8), (5, 6, 3)])
def test_max_pool_cpu_equals_xla_and_flax(spatial):
    x, _ = _inputs(2, spatial, 3, 1, 1)  # continuous random values: no tied maxima
    expected = nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2), padding="SAME")
    for impl in ("xla", "cpu"):
        assert jnp.array_equal(conv_ops.max_pool(x, impl), expected), impl
    grads = {impl: jax.grad(lambda x, impl=impl: jnp.sum(jnp.sin(conv_ops.max_pool(x, impl))))(x)
             for impl in ("xla", "cpu")}
    assert jnp.array_equal(grads["cpu"], grads["xla"])
    assert int(jnp.count_nonzero(grads["cpu"])) == expected.size  # one winner per window


@pytest.mark.parametrize(("batch", "spatial", "cin", "cout"), DOWN_CASES)
def test_down_conv_cpu_equals_xla(batch, spatial, cin, cout):
    x, kernel = _inputs(batch, spatial, cin, cout, 2)
    _assert_cpu_equals_xla(conv_ops.down_conv, x, kernel)


@pytest.mark.parametrize(("batch", "spatial", "cin", "cout"), UP_CASES)
def test_up_conv_cpu_equals_xla(batch, spatial, cin, cout):
    x, kernel = _inputs(batch, spatial, cin, cout, 2)
    _assert_cpu_equals_xla(conv_ops.up_conv, x, kernel)


def test_ops_match_flax_layers():
    """Same kernels as flax Conv / ConvTranspose(transpose_kernel=False) store them."""
    x, _ = _inputs(1, (8, 8, 8), 3, 4, 3)
    layers = {
        conv_ops.conv3d: nn.Conv(4, (3, 3, 3), padding="SAME", use_bias=False),
        conv_ops.down_conv: nn.Conv(4, (2, 2, 2), (2, 2, 2), padding="VALID", use_bias=False),
        conv_ops.up_conv: nn.ConvTranspose(4, (2, 2, 2), (2, 2, 2), padding="SAME",
                                           use_bias=False),
    }
    for op, layer in layers.items():
        params = layer.init(jax.random.key(0), x)
        expected = layer.apply(params, x)
        actual = op(x, params["params"]["kernel"], "cpu")
        assert _relative_l2(actual, expected) < TOLERANCE, op.__name__


def test_auto_is_cpu_on_cpu_backend():
    assert jax.default_backend() == "cpu"
    assert conv_ops.resolve_impl("auto") == "cpu"
    assert conv_ops.resolve_impl("xla") == "xla"


def test_unknown_impl_is_rejected():
    x, kernel = _inputs(1, (4, 4, 4), 2, 2, 3)
    with pytest.raises(ValueError, match="unknown conv impl"):
        conv_ops.conv3d(x, kernel, "cudnn")


def test_cpu_xla_flags_appended_not_clobbered(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv(cpu_env.OPT_OUT_VAR, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/nowhere")
    monkeypatch.setattr(cpu_env, "_backend_initialised", lambda: False)
    assert cpu_env.configure_environment()
    flags = cpu_env.os.environ["XLA_FLAGS"].split()
    assert flags == ["--xla_dump_to=/nowhere", *cpu_env.XLA_CPU_FLAGS]
    assert cpu_env.configure_environment()  # idempotent
    assert cpu_env.os.environ["XLA_FLAGS"].split() == flags


def test_cpu_tuning_opt_out_and_accelerators(monkeypatch):
    monkeypatch.setattr(cpu_env, "_backend_initialised", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv(cpu_env.OPT_OUT_VAR, "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not cpu_env.configure_environment()
    monkeypatch.delenv(cpu_env.OPT_OUT_VAR)
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert not cpu_env.configure_environment()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setattr(cpu_env, "flags_known", lambda: False)  # an unchecked jaxlib
    assert not cpu_env.configure_environment()
    assert cpu_env.os.environ["XLA_FLAGS"] == ""


def test_maybe_reexec_sets_glibc_tunables_once(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_env.os, "execve", lambda *args: calls.append(args))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv(cpu_env.OPT_OUT_VAR, raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(cpu_env.sys, "orig_argv", ["python", "-m", "mlssp_jax.train", "--fold=1"])
    cpu_env.maybe_reexec()
    (executable, argv, env), = calls
    assert argv[1:] == ["-m", "mlssp_jax.train", "--fold=1"]
    assert env["GLIBC_TUNABLES"] == cpu_env.GLIBC_TUNABLES
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")  # the user's own: kept
    cpu_env.maybe_reexec()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv(cpu_env.OPT_OUT_VAR, "1")
    cpu_env.maybe_reexec()
    assert len(calls) == 1
