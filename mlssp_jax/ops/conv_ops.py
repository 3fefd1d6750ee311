"""The network's windowed ops (three convolutions, max pooling) as pure functions, with a
choice of implementation.

All arrays are channels-last: ``x`` is ``(B, D, H, W, Cin)``, kernels are DHWIO
``(kd, kh, kw, Cin, Cout)`` exactly as ``flax.linen.Conv`` / ``ConvTranspose`` store them,
so every implementation reads the same parameters and checkpoints.

``impl``:

- ``"xla"``: XLA's native 3-D convolution (the TPU/GPU path).
- ``"cpu"``: the same maths re-expressed for XLA's CPU backend, which runs 3-D convolutions
  (and above all their weight gradients) an order of magnitude slower than 2-D ones:

  * 3x3x3 'SAME' conv: depth is folded into the batch and the conv becomes 2-D 3x3 convs
    over ``(B*D, H, W, C)`` planes, with a :func:`jax.custom_vjp` whose backward passes are
    2-D convs as well (see :func:`_conv3d_cpu`). Wide layers on small volumes use im2col +
    one matmul; small layers (few voxels and channels) keep XLA's native conv, which is as
    fast there and compiles several times faster (:func:`conv3d_formulation`).
  * 2x2x2 stride-2 down conv: space-to-depth + one matmul.
  * 2x2x2 stride-2 transposed up conv: one matmul + depth-to-space.
  * 2x2x2 stride-2 max pool: a reshape and a max over the window axes, whose gradient is
    an elementwise select instead of XLA's slow select-and-scatter.

  Forward values and gradients equal the ``"xla"`` path to float32 rounding
  (``tests/test_conv_ops.py``).
- ``"onednn"``: the ``"cpu"`` path with every 3-D convolution (forward and both gradients)
  run by oneDNN through an XLA FFI call (:mod:`mlssp_jax.ops.onednn`), the fastest on CPU;
  float32 only (other dtypes take the ``"cpu"`` formulations). Needs the oneDNN wheels and
  a C++ compiler; the handlers are compiled once per environment.
- ``"auto"``: on the CPU backend ``"onednn"`` where it is available and JAX has one
  device (else ``"cpu"``); on TPU/GPU ``"xla"`` (see :func:`resolve_impl`).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax

from mlssp_jax.config import CONV_IMPLS
from mlssp_jax.errors import InputError
from mlssp_jax.ops import onednn

log = logging.getLogger(__name__)

_DIMS = ("NDHWC", "DHWIO", "NDHWC")
_DIMS_2D = ("NHWC", "HWIO", "NHWC")
# Swapped weight gradient: the output gradient (B*D, H, W, Cout) is the conv input with
# Cout in the batch position and B*D as the contracted feature; the input planes are the kernel.
_DIMS_WGRAD = ("CHWN", "IHWO", "NHWC")

# Strategy thresholds in voxels per volume (D*H*W), measured on a 2-core Zen 5 (PERF_NOTES.md,
# benchmarks/README.md). Layers with at most _NATIVE_MAX_VOXELS voxels and fewer than
# _NATIVE_MAX_WORK voxels * Cin * Cout keep XLA's native conv (width <= 8 at 8^3 and 4^3).
_NATIVE_MAX_VOXELS = 8**3
_NATIVE_MAX_WORK = 2**22
_IM2COL_MAX_VOXELS = 4**3
_AUTODIFF_MAX_VOXELS = 8**3
_SPLIT_WGRAD_MAX_VOXELS = 16**3
# Inputs with fewer channels than this put the three depth taps into the input channels.
_TAPS_IN_INPUT_MAX_CIN = 4


def resolve_impl(impl: str) -> str:
    """Map ``"auto"`` to ``"xla"`` on accelerators; on JAX's CPU backend to ``"onednn"``
    with one device, ``"cpu"`` with several or without oneDNN. An explicit ``"onednn"`` that
    cannot run raises InputError with the reason; an unknown name raises ValueError.

    oneDNN calls are opaque to XLA's SPMD partitioner, which gathers the whole batch and
    runs them on every device: correct, but no data parallelism. The ``"cpu"`` formulations
    are XLA ops and partition over the batch.
    """
    if impl == "auto":
        if jax.default_backend() != "cpu":
            return "xla"
        if jax.device_count() > 1:
            return "cpu"
        if not onednn.available():
            _log_fallback_once(onednn.status().reason)
            return "cpu"
        return "onednn"
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv impl {impl!r}")
    if impl == "onednn" and not onednn.available():
        raise InputError(f"model.conv_impl = 'onednn' cannot run here: {onednn.status().reason}")
    return impl


def _runs_on_onednn(impl: str, *arrays: jax.Array) -> bool:
    """Whether a resolved ``impl`` sends these operands to oneDNN (float32 only)."""
    return impl == "onednn" and all(a.dtype == jnp.float32 for a in arrays)


@functools.cache
def _log_fallback_once(reason: str) -> None:
    log.info("conv_impl 'auto' uses the 2-D formulations (slower on CPU): %s", reason)


def conv3d(x: jax.Array, kernel: jax.Array, impl: str = "auto") -> jax.Array:
    """'SAME' stride-1 3-D convolution. x (B, D, H, W, Cin), kernel (3, 3, 3, Cin, Cout).

    ``"onednn"`` runs float32 convolutions of any kernel size; the ``"cpu"`` formulations
    cover 3x3x3 kernels (the only size the network uses), other sizes fall back to XLA's
    native conv.
    """
    impl = resolve_impl(impl)
    if _runs_on_onednn(impl, x, kernel):
        return onednn.conv3d(x, kernel)
    if impl == "xla" or kernel.shape[:3] != (3, 3, 3):
        return _conv3d_native(x, kernel)
    return _conv3d_cpu_dispatch(x, kernel)


def conv3d_bias_relu(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                     impl: str = "auto") -> jax.Array:
    """``relu(conv3d(x, kernel) + bias)``; bias (Cout,). ``"onednn"`` fuses the three into one
    pass (float32); the other implementations compute them in turn (XLA fuses bias + ReLU)."""
    impl = resolve_impl(impl)
    if _runs_on_onednn(impl, x, kernel, bias):
        return onednn.conv3d_bias_relu(x, kernel, bias)
    return jax.nn.relu(conv3d(x, kernel, impl) + bias)


def down_conv(x: jax.Array, kernel: jax.Array, impl: str = "auto") -> jax.Array:
    """2x2x2 stride-2 'VALID' convolution: (B, D, H, W, Cin) -> (B, D/2, H/2, W/2, Cout)."""
    impl = resolve_impl(impl)
    if impl == "xla":
        return lax.conv_general_dilated(x, kernel, (2, 2, 2), "VALID", dimension_numbers=_DIMS)
    if _runs_on_onednn(impl, x, kernel):
        _, d, h, w, _ = x.shape
        return onednn.conv3d(x[:, : d // 2 * 2, : h // 2 * 2, : w // 2 * 2], kernel, 2)
    return _down_conv_matmul(x, kernel)


def up_conv(x: jax.Array, kernel: jax.Array, impl: str = "auto") -> jax.Array:
    """2x2x2 stride-2 transposed conv as ``flax.linen.ConvTranspose`` computes it.

    (B, D, H, W, Cin) -> (B, 2D, 2H, 2W, Cout); kernel (2, 2, 2, Cin, Cout), padding 'SAME',
    ``transpose_kernel=False`` (so out[2i+a] = x[i] @ kernel[1-a] along each axis).
    """
    impl = resolve_impl(impl)
    if impl == "xla":
        return lax.conv_transpose(x, kernel, (2, 2, 2), "SAME", dimension_numbers=_DIMS)
    if _runs_on_onednn(impl, x, kernel):
        # out[2i+a] = x[i] @ kernel[1-a]: the transpose of a stride-2 conv whose kernel is
        # the flipped one with Cin and Cout swapped.
        flipped = kernel[::-1, ::-1, ::-1].transpose(0, 1, 2, 4, 3)
        return onednn.conv3d_transpose(x, flipped, 2)
    return _up_conv_matmul(x, kernel)


def max_pool(x: jax.Array, impl: str = "auto") -> jax.Array:
    """2x2x2 stride-2 'SAME' max pool, as ``flax.linen.max_pool`` computes it.

    (B, D, H, W, C) -> (B, ceil(D/2), ceil(H/2), ceil(W/2), C); an odd axis is padded with
    -inf at its end. The ``"cpu"`` path is a reshape + max: same values; where a window
    holds tied maxima its gradient is shared among them (XLA's select-and-scatter gives it
    to the first), which after a ReLU only happens between zeros, whose gradient is zero.
    ``"onednn"`` runs oneDNN's max pooling (float32), whose gradient, like XLA's, goes to
    the first maximum.
    """
    impl = resolve_impl(impl)
    window = (1, 2, 2, 2, 1)
    if impl == "xla":
        return lax.reduce_window(x, -jnp.inf, lax.max, window, window, "SAME")
    if _runs_on_onednn(impl, x):
        return onednn.max_pool(x, 2)
    b, d, h, w, c = x.shape
    pads = [(0, 0)] + [(0, n % 2) for n in (d, h, w)] + [(0, 0)]
    x = jnp.pad(x, pads, constant_values=-jnp.inf)
    d2, h2, w2 = (d + 1) // 2, (h + 1) // 2, (w + 1) // 2
    return x.reshape(b, d2, 2, h2, 2, w2, 2, c).max(axis=(2, 4, 6))


# ---------------------------------------------------------------- 2x2x2 stride-2 (matmuls)


def _down_conv_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Space-to-depth + one matmul. x (B, D, H, W, Ci), kernel (2, 2, 2, Ci, Co).

    Odd trailing voxels are dropped, as a 'VALID' stride-2 conv does.
    """
    b, d, h, w, ci = x.shape
    co = kernel.shape[-1]
    d2, h2, w2 = d // 2, h // 2, w // 2
    x = x[:, : 2 * d2, : 2 * h2, : 2 * w2]
    x = x.reshape(b, d2, 2, h2, 2, w2, 2, ci)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # (B, D/2, H/2, W/2, 2, 2, 2, Ci)
    y = x.reshape(-1, 8 * ci) @ kernel.reshape(8 * ci, co)
    return y.reshape(b, d2, h2, w2, co)


def _up_conv_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """One matmul + depth-to-space. x (B, D, H, W, Ci), kernel (2, 2, 2, Ci, Co).

    flax's ConvTranspose (transpose_kernel=False, 'SAME') maps out[2i+a] = x[i] @ kernel[1-a],
    hence the kernel flip.
    """
    b, d, h, w, ci = x.shape
    co = kernel.shape[-1]
    k = kernel[::-1, ::-1, ::-1].transpose(3, 0, 1, 2, 4)  # (Ci, 2, 2, 2, Co)
    y = x.reshape(-1, ci) @ k.reshape(ci, 8 * co)  # (B*D*H*W, 8*Co)
    y = y.reshape(b, d, h, w, 2, 2, 2, co).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return y.reshape(b, 2 * d, 2 * h, 2 * w, co)


# ---------------------------------------------------------------- 3x3x3 'SAME' (2-D convs)


def conv3d_formulation(x_shape: tuple[int, ...], cout: int) -> str:
    """Which CPU formulation :func:`conv3d` uses for input ``(B, D, H, W, Cin)`` and ``cout``.

    One of ``"native"`` (XLA's conv), ``"im2col"``, ``"depth_split"`` (2-D convs,
    autodiff), ``"split_wgrad"`` / ``"concat_wgrad"`` (2-D convs, custom VJP with the
    kernel gradient as three convs / one conv): the fastest measured for that size.
    """
    voxels = x_shape[1] * x_shape[2] * x_shape[3]
    if voxels <= _NATIVE_MAX_VOXELS and voxels * x_shape[4] * cout < _NATIVE_MAX_WORK:
        return "native"
    if voxels <= _IM2COL_MAX_VOXELS:
        return "im2col"
    if voxels <= _AUTODIFF_MAX_VOXELS:
        return "depth_split"
    return "split_wgrad" if voxels <= _SPLIT_WGRAD_MAX_VOXELS else "concat_wgrad"


def _conv3d_native(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME", dimension_numbers=_DIMS)


def _conv3d_cpu_dispatch(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Run the formulation :func:`conv3d_formulation` picks for this layer."""
    return FORMULATIONS[conv3d_formulation(x.shape, kernel.shape[-1])](x, kernel)


def _conv3d_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """27 shifted copies concatenated into channels, then one matmul (small volumes only).

    x (B, D, H, W, Ci), kernel (3, 3, 3, Ci, Co) -> (B, D, H, W, Co).
    """
    b, d, h, w, ci = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
    patches = [xp[:, i : i + d, j : j + h, k : k + w]
               for i in range(3) for j in range(3) for k in range(3)]
    patches = jnp.concatenate(patches, axis=-1)  # (B, D, H, W, 27*Ci)
    return patches @ kernel.reshape(27 * ci, -1)


def _conv2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'SAME' 2-D conv. x (N, H, W, Ci), kernel (3, 3, Ci, Co) -> (N, H, W, Co)."""
    return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DIMS_2D)


def _depth_taps(x: jax.Array) -> list[jax.Array]:
    """The three depth-shifted copies x[d-1], x[d], x[d+1] (zero outside). Each (B, D, H, W, C)."""
    d = x.shape[1]
    xp = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
    return [xp[:, t : t + d] for t in range(3)]


def _conv3d_depth_split(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3x3 'SAME' conv as 2-D convs over depth planes (differentiable by autodiff).

    x (B, D, H, W, Ci), kernel (3, 3, 3, Ci, Co) -> (B, D, H, W, Co).
    Few input channels: the depth taps are concatenated into the input channels, one
    conv 3*Ci -> Co. Otherwise: one conv Ci -> 3*Co whose output channels stack the
    depth taps, then a shift-and-add along depth.
    """
    b, d, h, w, ci = x.shape
    co = kernel.shape[-1]
    if ci < _TAPS_IN_INPUT_MAX_CIN:
        taps = jnp.concatenate(_depth_taps(x), axis=-1)  # (B, D, H, W, 3*Ci)
        k = kernel.transpose(1, 2, 0, 3, 4).reshape(3, 3, 3 * ci, co)
        return _conv2d(taps.reshape(b * d, h, w, 3 * ci), k).reshape(b, d, h, w, co)
    k = kernel.transpose(1, 2, 3, 0, 4).reshape(3, 3, ci, 3 * co)
    y = _conv2d(x.reshape(b * d, h, w, ci), k).reshape(b, d, h, w, 3, co)
    return _shift_add(y)


def _shift_add(y: jax.Array) -> jax.Array:
    """out[d] = y[d-1, tap 0] + y[d, tap 1] + y[d+1, tap 2].

    y (B, D, H, W, 3, Co) -> (B, D, H, W, Co).
    """
    zero = jnp.zeros_like(y[:, :1, ..., 0, :])
    below = jnp.concatenate([zero, y[:, :-1, ..., 0, :]], axis=1)
    above = jnp.concatenate([y[:, 1:, ..., 2, :], zero], axis=1)
    return below + y[..., 1, :] + above


def _weight_grad(x: jax.Array, g: jax.Array, split: bool) -> jax.Array:
    """Kernel gradient of the 3x3x3 'SAME' conv, "swapped" form.

    x (B, D, H, W, Ci), g = dL/d out (B, D, H, W, Co) -> (3, 3, 3, Ci, Co).
    The output gradient is the conv input (Co as batch, the B*D planes as the contracted
    features, padded by 1 in H and W); each depth-shifted input copy is the H x W kernel.
    With ``split`` the three depth taps are three convs, else one conv over the
    concatenated copies.
    """
    b, d, h, w, ci = x.shape
    co = g.shape[-1]
    g2 = g.reshape(b * d, h, w, co)
    taps = [t.reshape(b * d, h, w, ci) for t in _depth_taps(x)]
    conv = functools.partial(lax.conv_general_dilated, window_strides=(1, 1),
                             padding=((1, 1), (1, 1)), dimension_numbers=_DIMS_WGRAD)
    if split:
        out = jnp.stack([conv(g2, t) for t in taps], axis=3)  # (Co, 3, 3, 3, Ci)
    else:
        out = conv(g2, jnp.concatenate(taps, axis=-1)).reshape(co, 3, 3, 3, ci)
    # out[o, 2-kh, 2-kw, t, i] = dk[t, kh, kw, i, o]
    return out[:, ::-1, ::-1].transpose(3, 1, 2, 4, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3d_cpu(x: jax.Array, kernel: jax.Array, split_wgrad: bool) -> jax.Array:
    """3x3x3 'SAME' conv from 2-D convs, forward and backward.

    x (B, D, H, W, Ci), kernel (3, 3, 3, Ci, Co) -> (B, D, H, W, Co).
    Forward: :func:`_conv3d_depth_split`. Input gradient: the same op on the output
    gradient with the flipped, in/out-swapped kernel. Kernel gradient: :func:`_weight_grad`.
    """
    return _conv3d_depth_split(x, kernel)


def _conv3d_cpu_fwd(x, kernel, split_wgrad):
    return _conv3d_depth_split(x, kernel), (x, kernel)


def _conv3d_cpu_bwd(split_wgrad, residuals, g):
    x, kernel = residuals
    flipped = kernel[::-1, ::-1, ::-1].transpose(0, 1, 2, 4, 3)  # (3, 3, 3, Co, Ci)
    dx = _conv3d_depth_split(g, flipped).astype(x.dtype)
    dk = _weight_grad(x, g, split_wgrad).astype(kernel.dtype)
    return dx, dk


_conv3d_cpu.defvjp(_conv3d_cpu_fwd, _conv3d_cpu_bwd)

# conv3d_formulation name -> (x, kernel) -> output; every one equals _conv3d_native.
FORMULATIONS = {
    "native": _conv3d_native,
    "im2col": _conv3d_im2col,
    "depth_split": _conv3d_depth_split,
    "split_wgrad": lambda x, kernel: _conv3d_cpu(x, kernel, True),
    "concat_wgrad": lambda x, kernel: _conv3d_cpu(x, kernel, False),
}


__all__ = ["conv3d", "conv3d_bias_relu", "conv3d_formulation", "down_conv", "max_pool",
           "resolve_impl", "up_conv"]
