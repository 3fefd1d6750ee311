"""The CPU convolution paths (``"cpu"``, ``"onednn"``) equal XLA's native convolution,
values and gradients.

Every layer shape of the network at small sizes: the 1-channel stem, C -> C and
2C -> C convs at each level (16^3 .. 2^3, so each formulation is exercised), the
2x2x2 down and up convs, odd channel counts, batch 1 and 2, non-cubic volumes.
Gradients are compared by global relative L2 (PERF_NOTES.md: element-wise maxima
mislead in float32).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlssp_jax.errors import InputError
from mlssp_jax.ops import conv_ops, cpu_env, onednn

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
              (1, (6, 10, 4), 3, 5), (1, (5, 7, 4), 3, 2)]  # odd sizes: last voxel dropped
UP_CASES = [(2, (8, 8, 8), 6, 3), (1, (2, 2, 2), 14, 7), (2, (4, 4, 4), 5, 3),
            (1, (3, 5, 2), 3, 5),
            (2, (4, 4, 4), 16, 8), (1, (3, 5, 11), 5, 8)]  # 8 out: the AVX-512 up conv
# Eight output channels: oneDNN's primitives are replaced by csrc/direct_conv.cc's kernels
# (3x3x3 forward; and the stride-2 input gradient, the down conv's backward here).
DIRECT_CASES = [(2, (3, 4, 16), 1, 8), (1, (4, 5, 37), 8, 8),  # W: one chunk; 2 + a tail
                (1, (5, 3, 7), 16, 8), (1, (2, 2, 1), 3, 8)]
DOWN_CASES += [(1, (6, 10, 4), 8, 16)]


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


def _assert_cpu_equals_xla(op, x, kernel, impl="cpu"):
    expected = _value_and_grads(op, x, kernel, "xla")
    actual = _value_and_grads(op, x, kernel, impl)
    for name, a, e in zip(("output", "d_input", "d_kernel"), actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert _relative_l2(a, e) < TOLERANCE, (name, _relative_l2(a, e))


@pytest.mark.parametrize(("batch", "spatial", "cin", "cout"), CONV3D_CASES)
def test_conv3d_cpu_equals_xla(batch, spatial, cin, cout):
    x, kernel = _inputs(batch, spatial, cin, cout, 3)
    _assert_cpu_equals_xla(conv_ops.conv3d, x, kernel)


# The package depends on the oneDNN wheels on Linux x86-64 (pyproject.toml): there the
# oneDNN convolution must build and run; elsewhere it is legitimately absent.
ONEDNN_EXPECTED = sys.platform.startswith("linux") and platform.machine() == "x86_64"
needs_onednn = pytest.mark.skipif(not ONEDNN_EXPECTED, reason="oneDNN wheels: Linux x86-64 only")


@needs_onednn
def test_onednn_convolution_builds_here():
    assert onednn.status().available, onednn.status().reason
    assert conv_ops.resolve_impl("auto") == "onednn"


@needs_onednn
@pytest.mark.parametrize(("batch", "spatial", "cin", "cout"), CONV3D_CASES)
def test_conv3d_onednn_equals_xla(batch, spatial, cin, cout):
    x, kernel = _inputs(batch, spatial, cin, cout, 3)
    _assert_cpu_equals_xla(conv_ops.conv3d, x, kernel, "onednn")


@needs_onednn
@pytest.mark.parametrize(("batch", "spatial", "cin", "cout"),
                         [(2, (16, 16, 16), 1, 3), (1, (8, 6, 8), 6, 5), (2, (4, 4, 4), 7, 7)])
def test_conv3d_bias_relu_onednn_equals_xla(batch, spatial, cin, cout):
    """The fused conv + bias + ReLU: output and gradients w.r.t. input, kernel and bias."""
    x, kernel = _inputs(batch, spatial, cin, cout, 3)
    bias = jnp.linspace(-0.5, 0.5, cout, dtype=jnp.float32)  # some units mostly off

    def value_and_grads(impl):
        def loss(x, kernel, bias):
            y = conv_ops.conv3d_bias_relu(x, kernel, bias, impl)
            return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(x, kernel, bias)
        return y, *grads

    expected = value_and_grads("xla")
    for name, a, e in zip(("output", "d_input", "d_kernel", "d_bias"), value_and_grads("onednn"),
                          expected, strict=True):
        assert a.shape == e.shape and _relative_l2(a, e) < TOLERANCE, name
    assert 0 < int(jnp.count_nonzero(expected[0])) < expected[0].size  # the ReLU clips some


@needs_onednn
@pytest.mark.parametrize(("batch", "spatial", "cin", "cout"), DIRECT_CASES)
def test_eight_channel_convs_equal_xla(batch, spatial, cin, cout):
    """The AVX-512 kernel for 8 output channels, with and without bias + ReLU (rows longer
    than a chunk, odd tails, one input channel, a 1-voxel axis)."""
    x, kernel = _inputs(batch, spatial, cin, cout, 3)
    _assert_cpu_equals_xla(conv_ops.conv3d, x, kernel, "onednn")
    bias = jnp.linspace(-0.5, 0.5, cout, dtype=jnp.float32)
    fused = conv_ops.conv3d_bias_relu(x, kernel, bias, "onednn")
    expected = jax.nn.relu(conv_ops.conv3d(x, kernel, "xla") + bias)
    assert _relative_l2(fused, expected) < TOLERANCE


DIRECT_PROBE = """
import jax.numpy as jnp, numpy as np
from mlssp_jax.ops import conv_ops
x = jnp.ones((1, 4, 4, 4, 3)); k = jnp.ones((3, 3, 3, 3, 8)) / 81
conv_ops.conv3d_bias_relu(x, k, jnp.zeros(8), "onednn").block_until_ready()
y = jnp.ones((1, 2, 2, 2, 16)); kt = jnp.ones((2, 2, 2, 16, 8)) / 16
conv_ops.up_conv(y, kt, "onednn").block_until_ready()
"""


@needs_onednn
def test_eight_channel_convs_leave_onednn_unless_turned_off(tmp_path):
    """oneDNN's verbose log lists a primitive it runs: with the direct kernels on (the
    default) neither the 3x3x3 conv to 8 channels nor the up conv to 8 is among them."""
    def onednn_runs(direct: str) -> list[str]:
        env = {**os.environ, "ONEDNN_VERBOSE": "1", onednn.DIRECT_CONV_VAR: direct}
        out = subprocess.run([sys.executable, "-c", DIRECT_PROBE], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120, check=True).stdout
        return [line for line in out.splitlines() if ",exec," in line and "convolution" in line]

    assert onednn_runs("1") == []
    off = onednn_runs("0")
    assert any("ic3oc8" in line and "kd3" in line for line in off)
    assert any("backward_data" in line and "ic8oc16" in line for line in off)


@needs_onednn
@pytest.mark.parametrize("ksize", [1, 2, 5])
def test_onednn_other_kernel_sizes_equal_xla(ksize):
    """Any 'SAME' kernel, odd or even (XLA pads an even kernel one more at the end)."""
    x, kernel = _inputs(1, (6, 7, 5), 3, 4, ksize)
    _assert_cpu_equals_xla(conv_ops.conv3d, x, kernel, "onednn")


@needs_onednn
def test_onednn_under_vmap_and_bfloat16_fallback():
    x, kernel = _inputs(2, (6, 6, 6), 3, 4, 3)
    expected = conv_ops.conv3d(x, kernel, "xla")
    mapped = jax.vmap(lambda x: conv_ops.conv3d(x[None], kernel, "onednn")[0])(x)
    assert _relative_l2(mapped, expected) < TOLERANCE
    # bfloat16 is not a oneDNN dtype here: the "cpu" formulations run it
    low = conv_ops.conv3d(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), "onednn")
    assert low.dtype == jnp.bfloat16
    assert _relative_l2(low.astype(jnp.float32), expected) < 2e-2


def test_auto_falls_back_with_several_devices_or_without_onednn(monkeypatch):
    monkeypatch.setattr(onednn, "status", lambda: onednn.Status(True, "lib.so"))
    monkeypatch.setattr(jax, "device_count", lambda: 2)  # oneDNN calls do not partition
    assert conv_ops.resolve_impl("auto") == "cpu"
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert conv_ops.resolve_impl("auto") == "onednn"
    monkeypatch.setattr(onednn, "status", lambda: onednn.Status(False, "no C++ compiler found"))
    assert conv_ops.resolve_impl("auto") == "cpu"
    with pytest.raises(InputError, match="'onednn' cannot run here: no C\\+\\+ compiler"):
        conv_ops.resolve_impl("onednn")


def test_onednn_status_names_what_is_missing(monkeypatch):
    build = onednn.status.__wrapped__  # uncached: registers nothing when a prerequisite fails
    monkeypatch.setattr(onednn, "find_onednn", lambda: None)
    assert build() == onednn.Status(False, onednn.MISSING_ONEDNN)
    monkeypatch.setattr(onednn, "find_onednn", lambda: onednn.Path("/opt/onednn"))
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert not onednn.buildable()
    assert build() == onednn.Status(False, onednn.MISSING_COMPILER)


@needs_onednn
def test_failed_compile_reports_and_leaves_no_library(monkeypatch, tmp_path):
    bad = tmp_path / "bad.cc"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(onednn, "SOURCES", (bad,))
    library = tmp_path / "ext" / "lib.so"
    with pytest.raises(RuntimeError, match="compiling bad.cc failed"):
        onednn._build(onednn.find_compiler(), onednn.find_onednn(), library)
    assert list(library.parent.iterdir()) == []


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
    impls = ("xla", "cpu", "onednn") if onednn.available() else ("xla", "cpu")
    for impl in impls:
        assert jnp.array_equal(conv_ops.max_pool(x, impl), expected), impl
    grads = {impl: jax.grad(lambda x, impl=impl: jnp.sum(jnp.sin(conv_ops.max_pool(x, impl))))(x)
             for impl in impls}
    for impl in impls:
        assert jnp.array_equal(grads[impl], grads["xla"]), impl
    assert int(jnp.count_nonzero(grads["cpu"])) == expected.size  # one winner per window


CPU_IMPLS = ["cpu", pytest.param("onednn", marks=needs_onednn)]


@needs_onednn
def test_onednn_max_pool_gradient_goes_to_first_maximum_like_xla():
    """Tied maxima (0/1 inputs, as after a ReLU): oneDNN picks the same winner as XLA."""
    x = jnp.asarray(np.random.default_rng(0).integers(0, 2, size=(2, 6, 4, 8, 3)), jnp.float32)
    weights = jnp.arange(1.0, 1.0 + 2 * 3 * 2 * 4 * 3).reshape(2, 3, 2, 4, 3)
    grads = {impl: jax.grad(lambda x, impl=impl: jnp.sum(conv_ops.max_pool(x, impl) * weights))(x)
             for impl in ("xla", "onednn")}
    assert jnp.array_equal(grads["onednn"], grads["xla"])


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize(("batch", "spatial", "cin", "cout"), DOWN_CASES)
def test_down_conv_cpu_equals_xla(batch, spatial, cin, cout, impl):
    x, kernel = _inputs(batch, spatial, cin, cout, 2)
    _assert_cpu_equals_xla(conv_ops.down_conv, x, kernel, impl)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize(("batch", "spatial", "cin", "cout"), UP_CASES)
def test_up_conv_cpu_equals_xla(batch, spatial, cin, cout, impl):
    x, kernel = _inputs(batch, spatial, cin, cout, 2)
    _assert_cpu_equals_xla(conv_ops.up_conv, x, kernel, impl)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_ops_match_flax_layers(impl):
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
        actual = op(x, params["params"]["kernel"], impl)
        assert _relative_l2(actual, expected) < TOLERANCE, op.__name__


def test_auto_is_a_cpu_path_on_cpu_backend():
    assert jax.default_backend() == "cpu"
    assert conv_ops.resolve_impl("auto") == ("onednn" if onednn.available() else "cpu")
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
    assert not cpu_env.configure_environment(xla_convs=False)  # oneDNN runs the convs
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
