"""The 3-D convolution on oneDNN's CPU kernels, called from jitted JAX code through XLA's FFI.

XLA's CPU backend has no fast 3-D convolution (its kernel gradient runs at half the speed of
its 2-D forward conv, see ``benchmarks/kernel_ceiling.py``); oneDNN, the library PyTorch uses
on CPU, has. ``csrc/conv3d_onednn.cc`` wraps oneDNN's forward (plain, and with bias + ReLU
fused), input-gradient and kernel-gradient convolution primitives, and its max pooling, as
XLA FFI handlers; convolutions to eight channels go to ``csrc/direct_conv.cc``'s AVX-512
kernels instead (:func:`direct_conv_enabled`). :func:`conv3d`, :func:`conv3d_bias_relu`,
:func:`conv3d_transpose` and :func:`max_pool` join them with :func:`jax.custom_vjp`, so they
are jittable and differentiable like any JAX op.

The handlers are compiled on first use, like ``torch.utils.cpp_extension.load``: with the
C++ compiler (``$CXX``, else ``c++``/``g++``), against jaxlib's FFI headers and the oneDNN
wheels the package depends on Linux x86-64 (``onednn-cpu-gomp`` and
``onednn-devel-cpu-gomp``: headers and ``libdnnl.so`` under the environment's prefix, or
under ``$MLSSP_JAX_ONEDNN_ROOT``). The library is cached in
``$MLSSP_JAX_CACHE/ext`` (default ``~/.cache/mlssp_jax/ext``) under a name that hashes the
sources, jaxlib and oneDNN versions and the compiler, so it is built once per environment
(~3 s). No network is used.

When anything is missing (no compiler, no oneDNN, another OS) :func:`status` says why and
``conv_impl = "auto"`` falls back to the 2-D formulations of :mod:`mlssp_jax.ops.conv_ops`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mlssp_jax import cache

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "conv3d_onednn.cc", CSRC / "direct_conv.cc")
HEADERS = (CSRC / "direct_conv.h",)
ROOT_VAR = "MLSSP_JAX_ONEDNN_ROOT"
DIRECT_CONV_VAR = "MLSSP_JAX_DIRECT_CONV"  # "0": every convolution on oneDNN
# FFI target name -> exported handler symbol in the compiled library.
TARGETS = {
    "mlssp_conv3d_forward": "MlsspConv3dForward",
    "mlssp_conv3d_forward_bias_relu": "MlsspConv3dForwardBiasRelu",
    "mlssp_conv3d_input_grad": "MlsspConv3dInputGrad",
    "mlssp_conv3d_kernel_grad": "MlsspConv3dKernelGrad",
    "mlssp_max_pool": "MlsspMaxPool",
    "mlssp_max_pool_grad": "MlsspMaxPoolGrad",
}
DIRECT_TARGETS = ("mlssp_conv3d_forward", "mlssp_conv3d_forward_bias_relu",  # take `direct`
                  "mlssp_conv3d_input_grad")
COMPILE_TIMEOUT_S = 300
MISSING_ONEDNN = (f"oneDNN not found (pip install onednn-cpu-gomp onednn-devel-cpu-gomp, "
                  f"or set {ROOT_VAR})")
MISSING_COMPILER = "no C++ compiler found (set CXX, or install g++)"


@dataclasses.dataclass(frozen=True)
class Status:
    """Whether the oneDNN convolution can run here; ``reason`` says why not (or the library)."""

    available: bool
    reason: str


def find_onednn() -> Path | None:
    """The prefix holding ``include/oneapi/dnnl/dnnl.hpp`` and ``lib/libdnnl.so``, if any.

    Searched: ``$MLSSP_JAX_ONEDNN_ROOT``, then where pip puts wheel data files (this
    environment's prefix, the user base).
    """
    candidates = [os.environ.get(ROOT_VAR), sysconfig.get_paths()["data"], sys.prefix,
                  sysconfig.get_config_var("userbase")]
    for prefix in filter(None, candidates):
        root = Path(prefix)
        if (root / "include/oneapi/dnnl/dnnl.hpp").is_file() and (root / "lib/libdnnl.so").exists():
            return root
    return None


def find_compiler() -> str | None:
    """``$CXX`` if set (even if it is not there: the user chose it), else ``c++`` or ``g++``."""
    if "CXX" in os.environ:
        return shutil.which(os.environ["CXX"])
    return shutil.which("c++") or shutil.which("g++")


def cache_dir() -> Path:
    """``<cache root>/ext`` (:func:`mlssp_jax.cache.cache_root`: ``$MLSSP_JAX_CACHE``, default
    ``~/.cache/mlssp_jax``)."""
    return cache.cache_root() / "ext"


def _compile_command(compiler: str, onednn: Path, output: Path) -> list[str]:
    lib = onednn / "lib"
    return [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w",
            f"-I{jax.ffi.include_dir()}", f"-I{onednn / 'include'}", *map(str, SOURCES),
            "-o", str(output), f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}"]


def _library_path(compiler: str, onednn: Path) -> Path:
    """Cache path of the compiled library: one per source, jaxlib, oneDNN and compiler."""
    version_header = onednn / "include/oneapi/dnnl/dnnl_version.h"
    key = hashlib.sha256()
    for part in (*(f.read_bytes() for f in SOURCES + HEADERS),
                 importlib.metadata.version("jaxlib").encode(),
                 version_header.read_bytes(), str(onednn).encode(), compiler.encode()):
        key.update(part)
    return cache_dir() / f"conv3d_onednn-{key.hexdigest()[:16]}.so"


def _build(compiler: str, onednn: Path, library: Path) -> None:
    """Compile to a temporary file beside ``library`` and rename it into place (atomic, so
    concurrent processes never load a half-written library). Raises RuntimeError."""
    library.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(fd)
    try:
        log.info("compiling the oneDNN convolution (%s), once per environment", library.name)
        result = subprocess.run(_compile_command(compiler, onednn, Path(tmp)),
                                capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"compiling {', '.join(f.name for f in SOURCES)} failed:\n{tail}")
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _missing_prerequisite() -> str | None:
    """Why the library cannot be built here (not Linux, no oneDNN, no compiler), or None."""
    if not sys.platform.startswith("linux"):
        return f"the oneDNN convolution is built for Linux only, not {sys.platform}"
    if find_onednn() is None:
        return MISSING_ONEDNN
    if find_compiler() is None:
        return MISSING_COMPILER
    return None


def buildable() -> bool:
    """Whether the prerequisites are here (Linux, oneDNN, a compiler); cheap, and does not
    start JAX's backend, so it can decide settings that must precede it."""
    return _missing_prerequisite() is None


@functools.cache
def status() -> Status:
    """Build (if not cached), load and register the FFI handlers once per process."""
    missing = _missing_prerequisite()
    if missing is not None:
        return Status(False, missing)
    onednn, compiler = find_onednn(), find_compiler()
    try:
        library = _library_path(compiler, onednn)
        if not library.exists():
            _build(compiler, onednn, library)
        handlers = ctypes.CDLL(str(library))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handlers, symbol)),
                                        platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning("oneDNN convolution unavailable: %s", err)
        return Status(False, str(err))
    return Status(True, str(library))


def available() -> bool:
    """Whether :func:`conv3d` can run in this process (see :func:`status` for why not)."""
    return status().available


def direct_conv_enabled() -> bool:
    """Whether convolutions to eight channels (forward 3x3x3, and the 2x2x2 stride-2 input
    gradient: the up conv) use the AVX-512 kernels of ``csrc/direct_conv.cc`` (where the CPU
    has AVX-512F) rather than oneDNN, which vectorises over output channels and so fills half
    of each register with eight. On unless ``$MLSSP_JAX_DIRECT_CONV`` is ``0``; read when a
    function is traced (JAX caches traces: set it before the first call)."""
    return os.environ.get(DIRECT_CONV_VAR, "1") != "0"


def _ffi(target: str, shape: tuple[int, ...], *args: jax.Array, stride: int) -> jax.Array:
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32),
                            vmap_method="sequential")
    if target in DIRECT_TARGETS:
        return call(*args, stride=np.int64(stride), direct=np.int64(direct_conv_enabled()))
    return call(*args, stride=np.int64(stride))


def _conv_output_shape(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
                       stride: int) -> tuple[int, ...]:
    if stride == 1:
        spatial = x_shape[1:4]
    else:
        spatial = tuple((n - k) // stride + 1 for n, k in zip(x_shape[1:4], kernel_shape[:3],
                                                               strict=True))
    return (x_shape[0], *spatial, kernel_shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3d(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """3-D convolution on oneDNN. float32 only; CPU backend only; call :func:`available` first.

    x (B, D, H, W, Cin), kernel (kd, kh, kw, Cin, Cout) DHWIO. ``stride`` 1: 'SAME' padding,
    -> (B, D, H, W, Cout); equals ``lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME")``
    to float32 rounding. ``stride`` s > 1: 'VALID', -> (B, (D-kd)/s+1, ..., Cout); D - kd
    (and H, W) must be multiples of s.
    """
    shape = _conv_output_shape(x.shape, kernel.shape, stride)
    return _ffi("mlssp_conv3d_forward", shape, x, kernel, stride=stride)


def _conv3d_fwd(x, kernel, stride):
    return conv3d(x, kernel, stride), (x, kernel)


def _conv3d_bwd(stride, residuals, g):
    x, kernel = residuals
    dx = _ffi("mlssp_conv3d_input_grad", x.shape, g, kernel, stride=stride)
    dkernel = _ffi("mlssp_conv3d_kernel_grad", kernel.shape, x, g, stride=stride)
    return dx, dkernel


conv3d.defvjp(_conv3d_fwd, _conv3d_bwd)


@jax.custom_vjp
def conv3d_bias_relu(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``relu(conv3d(x, kernel) + bias)`` ('SAME', stride 1) in one oneDNN pass: bias and ReLU
    are fused into the convolution's output write. bias (Cout,); shapes as :func:`conv3d`.

    Backward: the ReLU mask from the output, then the two convolution gradients.
    """
    shape = (*x.shape[:4], kernel.shape[-1])
    return _ffi("mlssp_conv3d_forward_bias_relu", shape, x, kernel, bias, stride=1)


def _conv3d_bias_relu_fwd(x, kernel, bias):
    y = conv3d_bias_relu(x, kernel, bias)
    return y, (x, kernel, y)


def _conv3d_bias_relu_bwd(residuals, g):
    x, kernel, y = residuals
    g = jnp.where(y > 0, g, 0.0)  # jax.nn.relu's gradient: 0 at 0
    dx, dkernel = _conv3d_bwd(1, (x, kernel), g)
    return dx, dkernel, jnp.sum(g, axis=(0, 1, 2, 3))


conv3d_bias_relu.defvjp(_conv3d_bias_relu_fwd, _conv3d_bias_relu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3d_transpose(y: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """The transpose (input gradient) of the 'VALID' ``conv3d(x, kernel, stride)``.

    y (B, D, H, W, Cout), kernel (kd, kh, kw, Cin, Cout) -> x-shaped (B, (D-1)*s+kd, ..., Cin):
    out[s*i + a] = sum_o y[i, o] kernel[a, :, o] along each axis.
    """
    spatial = tuple((n - 1) * stride + k for n, k in zip(y.shape[1:4], kernel.shape[:3],
                                                          strict=True))
    shape = (y.shape[0], *spatial, kernel.shape[3])
    return _ffi("mlssp_conv3d_input_grad", shape, y, kernel, stride=stride)


def _conv3d_transpose_fwd(y, kernel, stride):
    return conv3d_transpose(y, kernel, stride), (y, kernel)


def _conv3d_transpose_bwd(stride, residuals, g):
    y, kernel = residuals
    dy = _ffi("mlssp_conv3d_forward", y.shape, g, kernel, stride=stride)
    dkernel = _ffi("mlssp_conv3d_kernel_grad", kernel.shape, g, y, stride=stride)
    return dy, dkernel


conv3d_transpose.defvjp(_conv3d_transpose_fwd, _conv3d_transpose_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x: jax.Array, window: int = 2) -> jax.Array:
    """Max pooling with window = stride = ``window`` on oneDNN, 'SAME' as flax computes it.

    x (B, D, H, W, C) float32 -> (B, ceil(D/w), ceil(H/w), ceil(W/w), C); the padding at the
    end of an odd axis never wins. The gradient goes to the first maximum of each window.
    """
    return _max_pool_fwd(x, window)[0]


def _max_pool_fwd(x, window):
    shape = (x.shape[0], *(-(-n // window) for n in x.shape[1:4]), x.shape[4])
    # int32 per output element holds oneDNN's argmax workspace (u8 or s32; checked in C++)
    call = jax.ffi.ffi_call("mlssp_max_pool", (jax.ShapeDtypeStruct(shape, jnp.float32),
                                               jax.ShapeDtypeStruct(shape, jnp.int32)),
                            vmap_method="sequential")
    y, workspace = call(x, window=np.int64(window))
    return y, (workspace, x.shape)


def _max_pool_bwd(window, residuals, g):
    workspace, x_shape = residuals
    call = jax.ffi.ffi_call("mlssp_max_pool_grad", jax.ShapeDtypeStruct(x_shape, jnp.float32),
                            vmap_method="sequential")
    return (call(g, workspace, window=np.int64(window)),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


__all__ = ["Status", "available", "buildable", "conv3d", "conv3d_bias_relu", "conv3d_transpose",
           "direct_conv_enabled", "find_compiler", "find_onednn", "max_pool", "status"]
