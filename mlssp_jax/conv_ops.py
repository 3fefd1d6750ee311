"""The three convolutions of the network as pure functions, with a choice of implementation.

All arrays are channels-last: ``x`` is ``(B, D, H, W, Cin)``, kernels are DHWIO
``(kd, kh, kw, Cin, Cout)`` exactly as ``flax.linen.Conv`` / ``ConvTranspose`` store them,
so every implementation reads the same parameters and checkpoints.

``impl``: ``"xla"`` is XLA's native convolution (used on TPU/GPU); ``"auto"`` resolves
to the fastest measured formulation for the backend (see :func:`resolve_impl`).
"""

from __future__ import annotations

import jax
from jax import lax

_DIMS = ("NDHWC", "DHWIO", "NDHWC")


def resolve_impl(impl: str) -> str:
    """Map ``"auto"`` to a concrete implementation for the default backend."""
    if impl != "auto":
        return impl
    return "xla"


def conv3d(x: jax.Array, kernel: jax.Array, impl: str = "auto") -> jax.Array:
    """'SAME' stride-1 3-D convolution. x (B, D, H, W, Cin), kernel (k, k, k, Cin, Cout)."""
    impl = resolve_impl(impl)
    if impl == "xla":
        return lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME", dimension_numbers=_DIMS)
    raise ValueError(f"unknown conv impl {impl!r}")


def down_conv(x: jax.Array, kernel: jax.Array, impl: str = "auto") -> jax.Array:
    """2x2x2 stride-2 'VALID' convolution: (B, D, H, W, Cin) -> (B, D/2, H/2, W/2, Cout)."""
    impl = resolve_impl(impl)
    if impl == "xla":
        return lax.conv_general_dilated(x, kernel, (2, 2, 2), "VALID", dimension_numbers=_DIMS)
    raise ValueError(f"unknown conv impl {impl!r}")


def up_conv(x: jax.Array, kernel: jax.Array, impl: str = "auto") -> jax.Array:
    """2x2x2 stride-2 transposed conv as ``flax.linen.ConvTranspose`` computes it.

    (B, D, H, W, Cin) -> (B, 2D, 2H, 2W, Cout); kernel (2, 2, 2, Cin, Cout), padding 'SAME',
    ``transpose_kernel=False`` (so out[2i+a] = x[i] @ kernel[1-a] along each axis).
    """
    impl = resolve_impl(impl)
    if impl == "xla":
        return lax.conv_transpose(x, kernel, (2, 2, 2), "SAME", dimension_numbers=_DIMS)
    raise ValueError(f"unknown conv impl {impl!r}")


__all__ = ["conv3d", "down_conv", "up_conv", "resolve_impl"]
