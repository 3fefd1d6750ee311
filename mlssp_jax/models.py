"""The MLSSP model family: one multi-task network whose branch point is a parameter.

Shape contract (channels-last everywhere): input ``x`` is ``(B, S, S, S, 1)`` (any spatial
size divisible by 16; 64^3 in the paper); the output is a dict
``{"seg": (B, S, S, S, 1) logits or None, "cls": (B,) logits or None}``, float32 whatever
the compute dtype. No sigmoid in the module: it lives in the loss and in prediction.

Architecture (``w`` = ``width``; channels double per level):

- stem: two 3x3x3 conv + ReLU, ``w`` channels (shared by both tasks);
- segmentation branch, a 3D U-Net: encoder levels k = 1..4, each two 3x3x3 conv + ReLU
  (``w * 2**(k-1)`` channels, the skip) and a 2x2x2 stride-2 down conv; a bottom of two
  convs (``16 w``); decoder levels k = 4..1, each a 2x2x2 stride-2 transposed conv, skip
  concatenation and two convs (``w * 2**(k-1)``); a 1x1x1 conv to one logit per voxel;
- classification branch, a CNN: two blocks of 3x3x3 conv + ReLU + 2x2x2 stride-2 max pool
  (``2 w``, ``4 w`` channels), global average pooling, two dense + ReLU layers
  (``dense_units``) and one output logit. Option (``cls_pooling = "lesion"``, beyond the
  paper): pool over the segmentation branch's predicted lesion and a rim around it instead
  (the lesion probability as attention weights, gradient stopped), ``8 w`` pooled features.

Global average pooling, not flatten: a flattened 16^3 x 4w map would put ~8M parameters in
the first dense layer at the default width (80 training subjects) and tie the parameter
count to the VOI size; pooling keeps the model size-independent, as the issue asks.

``share_depth`` moves the branch point (the classification branch reads ``taps[share_depth]``):
0 = stem output (``mlssp``), k = 1..4 = output of encoder level k's down conv, i.e. the
first k down-samplings shared (``ynet`` = 4, the whole contracting path),
:data:`DECODER` = the decoder's last features (``he``: everything shared).
``unet3d`` has no classification branch, ``cnn`` no U-Net (stem + classification branch).
"""

from __future__ import annotations

import zlib
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlssp_jax.config import ModelConfig
from mlssp_jax.errors import InputError
from mlssp_jax.layers import Conv3x3x3, DownConv, PointConv, UpConv
from mlssp_jax.ops import conv_ops

LEVELS = 4
DECODER = LEVELS + 1  # share depth: classification head on the decoder's last features

# name -> (has segmentation, has classification, default share depth)
_VARIANTS = {
    "mlssp": (True, True, 0),
    "ynet": (True, True, LEVELS),
    "he": (True, True, DECODER),
    "unet3d": (True, False, 0),
    "cnn": (False, True, 0),
}
_MOVABLE = ("mlssp", "ynet")  # variants whose branch point ``share_depth`` may move


def has_tasks(name: str) -> tuple[bool, bool]:
    """(has segmentation, has classification) of the named variant."""
    if name not in _VARIANTS:
        raise InputError(f"model.name: unknown model {name!r}")
    seg, cls, _ = _VARIANTS[name]
    return seg, cls


def _wrap(module_cls: type[nn.Module], remat: bool) -> type[nn.Module]:
    return nn.remat(module_cls) if remat else module_cls


class ConvBlock(nn.Module):
    """Two 3x3x3 conv + ReLU: (B, D, H, W, Cin) -> (B, D, H, W, features)."""

    features: int
    conv_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(2):
            x = Conv3x3x3(self.features, self.conv_impl, self.dtype, relu=True, name=f"conv{i}")(x)
        return x


class EncoderLevel(nn.Module):
    """Two convs then a stride-2 down conv. Returns (skip (B, D, H, W, F), down (B, D/2, .., F))."""

    features: int
    conv_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        skip = ConvBlock(self.features, self.conv_impl, self.dtype, name="block")(x)
        down = DownConv(self.features, self.conv_impl, self.dtype, name="down")(skip)
        return skip, down


class DecoderLevel(nn.Module):
    """Up conv, skip concatenation, two convs: x (B, D, H, W, C) + skip (B, 2D, 2H, 2W, F)."""

    features: int
    conv_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
        up = UpConv(self.features, self.conv_impl, self.dtype, name="up")(x)  # (B, 2D, .., F)
        x = jnp.concatenate([up, skip.astype(up.dtype)], axis=-1)  # (B, 2D, 2H, 2W, 2F)
        return ConvBlock(self.features, self.conv_impl, self.dtype, name="block")(x)


class UNet(nn.Module):
    """3D U-Net on stem features (B, S, S, S, C).

    Returns (logits (B, S, S, S, 1) in the compute dtype, taps): ``taps[k]`` for k = 1..4 is
    encoder level k's down-sampled output, ``taps[DECODER]`` the decoder's last features;
    ``taps[0]`` is the input.
    """

    width: int
    conv_impl: str = "auto"
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        kw = {"conv_impl": self.conv_impl, "dtype": self.dtype}
        taps, skips = [x], []
        for k in range(1, LEVELS + 1):
            skip, x = _wrap(EncoderLevel, self.remat)(self.width * 2 ** (k - 1), **kw,
                                                      name=f"enc{k}")(x)
            skips.append(skip)
            taps.append(x)  # (B, S/2^k, S/2^k, S/2^k, w 2^(k-1))
        x = _wrap(ConvBlock, self.remat)(self.width * 2**LEVELS, **kw, name="bottom")(x)
        for k in range(LEVELS, 0, -1):
            x = _wrap(DecoderLevel, self.remat)(self.width * 2 ** (k - 1), **kw,
                                                name=f"dec{k}")(x, skips[k - 1])
        taps.append(x)  # (B, S, S, S, w)
        logits = PointConv(1, dtype=self.dtype, name="seg_out")(x)  # (B, S, S, S, 1)
        return logits, taps


POOL_FLOOR = 1e-3  # lesion pooling: uniform weight added everywhere (no lesion -> global mean)


def _weighted_mean(x: jax.Array, weights: jax.Array) -> jax.Array:
    """(B, D, H, W, C) features, (B, D, H, W, 1) weights >= 0 -> (B, C) weighted means."""
    weights = weights + POOL_FLOOR
    return jnp.sum(x * weights, axis=(1, 2, 3)) / jnp.sum(weights, axis=(1, 2, 3))


def lesion_rim_pool(x: jax.Array, seg_prob: jax.Array, rim_voxels: int) -> jax.Array:
    """Segmentation-guided pooling: (B, d, d, d, C) features and (B, S, S, S, 1) lesion
    probabilities (S a multiple of d) -> (B, 2C): the features' mean weighted by the lesion
    probability, then by a rim around it.

    The probability is block-averaged to the features' grid; the rim is its max-filter
    dilation by ``rim_voxels`` feature voxels minus the lesion itself.
    """
    b, s, d = seg_prob.shape[0], seg_prob.shape[1], x.shape[1]
    f = s // d
    lesion = seg_prob.reshape(b, d, f, d, f, d, f, 1).mean(axis=(2, 4, 6))  # (B, d, d, d, 1)
    k = 2 * rim_voxels + 1
    dilated = nn.max_pool(lesion, (k, k, k), strides=(1, 1, 1), padding="SAME")
    rim = jnp.clip(dilated - lesion, 0.0, 1.0)
    return jnp.concatenate([_weighted_mean(x, lesion), _weighted_mean(x, rim)], axis=-1)


class ClassifierHead(nn.Module):
    """Two conv + max-pool blocks, pooling, two dense + ReLU, one logit.

    (B, D, H, W, C) -> (B,) logits in the compute dtype. Pooling is 'SAME' (ceil), so even
    a 1^3 input (the bottom of a 16^3 volume) works. Without ``seg_prob`` the features are
    globally averaged (the paper's, (B, 4w)); with ``seg_prob`` (B, S, S, S, 1) they are
    pooled over the lesion and its rim (:func:`lesion_rim_pool`, (B, 8w)).
    """

    width: int
    dense_units: int
    conv_impl: str = "auto"
    dtype: Any = jnp.float32
    rim_voxels: int = 2

    @nn.compact
    def __call__(self, x: jax.Array, seg_prob: jax.Array | None = None) -> jax.Array:
        for i, features in enumerate((2 * self.width, 4 * self.width)):
            x = Conv3x3x3(features, self.conv_impl, self.dtype, relu=True, name=f"conv{i}")(x)
            x = conv_ops.max_pool(x, self.conv_impl)
        x = x.astype(jnp.float32)
        if seg_prob is None:
            x = jnp.mean(x, axis=(1, 2, 3))  # (B, 4w)
        else:
            x = lesion_rim_pool(x, seg_prob, self.rim_voxels)  # (B, 8w)
        for i in range(2):
            x = nn.relu(nn.Dense(self.dense_units, dtype=self.dtype,
                                 kernel_init=nn.initializers.he_normal(), name=f"dense{i}")(x))
        x = nn.Dense(1, dtype=self.dtype, kernel_init=nn.initializers.he_normal(),
                     name="cls_out")(x)  # (B, 1)
        return x[:, 0]


class MultiTaskNet(nn.Module):
    """Stem, optional U-Net, optional classification branch reading ``taps[share_depth]``.

    ``dtype`` is the compute dtype (parameters are always float32); outputs are float32.
    """

    seg: bool = True
    cls: bool = True
    share_depth: int = 0
    width: int = 32
    dense_units: int = 64
    conv_impl: str = "auto"
    dtype: Any = jnp.float32
    remat: bool = False
    cls_pooling: str = "global"
    cls_rim_voxels: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array | None]:
        chex.assert_rank(x, 5)
        chex.assert_axis_dimension(x, 4, 1)
        if any(s % 2**LEVELS for s in x.shape[1:4]):
            raise ValueError(f"spatial size {x.shape[1:4]} must be divisible by {2**LEVELS}")
        b, spatial = x.shape[0], x.shape[1:4]
        kw = {"conv_impl": self.conv_impl, "dtype": self.dtype}
        h = _wrap(ConvBlock, self.remat)(self.width, **kw, name="stem")(x)  # (B, S, S, S, w)
        out: dict[str, jax.Array | None] = {"seg": None, "cls": None}
        taps = [h]
        if self.seg:
            logits, taps = UNet(self.width, **kw, remat=self.remat, name="unet")(h)
            out["seg"] = logits.astype(jnp.float32)  # (B, S, S, S, 1)
            chex.assert_shape(out["seg"], (b, *spatial, 1))
        if self.cls:
            head = ClassifierHead(self.width, self.dense_units, **kw,
                                  rim_voxels=self.cls_rim_voxels, name="cls_head")
            guide = None
            if self.cls_pooling == "lesion":  # the classification loss does not train the seg
                guide = jax.lax.stop_gradient(jax.nn.sigmoid(out["seg"]))  # (B, S, S, S, 1)
            out["cls"] = head(taps[self.share_depth], guide).astype(jnp.float32)  # (B,)
            chex.assert_shape(out["cls"], (b,))
        return out


def build_model(model_cfg: ModelConfig) -> MultiTaskNet:
    """The variant ``model_cfg.name`` with its branch point (``share_depth`` -1 = default).

    ``share_depth`` >= 0 is only meaningful for ``mlssp`` and ``ynet`` (they then differ only
    in name); for the other variants it must stay -1.
    """
    has_tasks(model_cfg.name)  # raises for an unknown name
    seg, cls, depth = _VARIANTS[model_cfg.name]
    if model_cfg.share_depth != -1:
        if model_cfg.name not in _MOVABLE:
            raise InputError(f"model.share_depth: must be -1 for model '{model_cfg.name}' "
                             f"(only {', '.join(_MOVABLE)} have a movable branch point)")
        depth = model_cfg.share_depth
    # no segmentation to guide it (the CNN alone): the paper's global pooling, so one config
    # serves MLSSP and its baselines (the experiment's runs)
    pooling = model_cfg.cls_pooling if seg and cls else "global"
    return MultiTaskNet(seg=seg, cls=cls, share_depth=depth, width=model_cfg.width,
                        dense_units=model_cfg.dense_units, conv_impl=model_cfg.conv_impl,
                        dtype=jnp.dtype(model_cfg.dtype), remat=model_cfg.remat,
                        cls_pooling=pooling,
                        cls_rim_voxels=model_cfg.cls_rim_voxels)


# flax's he_normal: variance_scaling(2, "fan_in", "truncated_normal"), cut at 2 std devs;
# this constant is the std of a unit normal truncated to [-2, 2], which the scale undoes.
_TRUNCATED_STD = 0.87962566103423978


def init_params(model: nn.Module, size: int, seed: int) -> dict[str, Any]:
    """He-normal kernels and zero biases, drawn with NumPy on the host; a pure function of seed.

    Same distribution as the modules' flax initialisers (truncated normal,
    std sqrt(2 / fan_in), fan_in = prod(kernel.shape[:-1])), but without XLA: compiling
    threefry sampling for each of the ~40 parameter shapes took minutes on a 2-core CPU.
    Each leaf has its own generator, seeded by (seed, crc32 of its path), so the values do
    not depend on the order of the tree or on the host. Returns the ``params`` collection
    as float32 NumPy arrays; ``size`` is the input's spatial size (any multiple of 16).
    """
    x = jax.ShapeDtypeStruct((1, size, size, size, 1), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]

    def draw(path: tuple, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name = jax.tree_util.keystr(path)
        if not name.endswith("['kernel']"):
            return np.zeros(leaf.shape, np.float32)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        std = np.sqrt(2.0 / np.prod(leaf.shape[:-1])) / _TRUNCATED_STD
        values = rng.standard_normal(leaf.shape)
        while (outside := np.abs(values) > 2.0).any():
            values[outside] = rng.standard_normal(int(outside.sum()))
        return (values * std).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


__all__ = ["DECODER", "LEVELS", "MultiTaskNet", "build_model", "has_tasks", "init_params",
           "lesion_rim_pool"]


def abstract_params(model_cfg: ModelConfig, size: int) -> Any:
    """Shapes and dtypes (on one device) of the parameters of ``build_model(model_cfg)`` for
    ``(1, size, size, size, 1)`` inputs, without computing them (a restore target)."""
    model = build_model(model_cfg)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, size, 1)))["params"])
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
