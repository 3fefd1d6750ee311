"""The network's convolution layers: flax modules computing through :mod:`mlssp_jax.ops.conv_ops`.

Each layer stores its parameters exactly as ``flax.linen.Conv`` / ``ConvTranspose`` would
(``kernel`` DHWIO ``(kd, kh, kw, Cin, Cout)`` and ``bias`` ``(Cout,)``), so checkpoints are
interchangeable, but the arithmetic goes through ``conv_ops`` with the chosen ``conv_impl``
(``"auto"``, ``"xla"`` or a fast CPU path). Kernels are He-normal initialised (the paper uses
Kaiming initialisation), biases zero. ``param_dtype`` is the storage dtype (float32),
``dtype`` the compute dtype (``None`` = the promoted dtype of input and parameters).

All arrays are channels-last: ``x`` is ``(B, D, H, W, Cin)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlssp_jax.ops import conv_ops

Dtype = Any


def _params(module: nn.Module, x: jax.Array, window: tuple[int, int, int]):
    """Create (or fetch) ``kernel``/``bias`` and cast them and ``x`` to the compute dtype."""
    kernel = module.param("kernel", nn.initializers.he_normal(),
                          (*window, x.shape[-1], module.features), module.param_dtype)
    bias = module.param("bias", nn.initializers.zeros_init(), (module.features,),
                        module.param_dtype)
    return nn.dtypes.promote_dtype(x, kernel, bias, dtype=module.dtype)


class _WindowConv(nn.Module):
    """A convolution over a ``window`` computed by the ``conv_ops`` function ``op``."""

    features: int
    conv_impl: str = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    window: ClassVar[tuple[int, int, int]]
    op: ClassVar[Callable[[jax.Array, jax.Array, str], jax.Array]]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = _params(self, x, self.window)
        return self.op(x, kernel, self.conv_impl) + bias


class Conv3x3x3(_WindowConv):
    """'SAME' stride-1 3x3x3 convolution: (B, D, H, W, Cin) -> (B, D, H, W, features).

    With ``relu``, returns ``relu(conv + bias)`` (one fused pass where ``conv_impl`` runs
    oneDNN, :func:`conv_ops.conv3d_bias_relu`); parameters are the same either way.
    """

    relu: bool = False

    window = (3, 3, 3)
    op = staticmethod(conv_ops.conv3d)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = _params(self, x, self.window)
        if self.relu:
            return conv_ops.conv3d_bias_relu(x, kernel, bias, self.conv_impl)
        return self.op(x, kernel, self.conv_impl) + bias


class DownConv(_WindowConv):
    """2x2x2 stride-2 convolution: (B, D, H, W, Cin) -> (B, D/2, H/2, W/2, features)."""

    window = (2, 2, 2)
    op = staticmethod(conv_ops.down_conv)


class UpConv(_WindowConv):
    """2x2x2 stride-2 transposed convolution with ``flax.linen.ConvTranspose`` semantics.

    (B, D, H, W, Cin) -> (B, 2D, 2H, 2W, features).
    """

    window = (2, 2, 2)
    op = staticmethod(conv_ops.up_conv)


class PointConv(nn.Module):
    """1x1x1 convolution (one matmul over channels): (B, D, H, W, Cin) -> (B, D, H, W, features).

    Parameters as ``nn.Conv(features, (1, 1, 1))``; no ``conv_impl``: it is always one einsum.
    """

    features: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = _params(self, x, (1, 1, 1))
        return jnp.einsum("bdhwc,cf->bdhwf", x, kernel[0, 0, 0]) + bias


__all__ = ["Conv3x3x3", "DownConv", "UpConv", "PointConv"]
