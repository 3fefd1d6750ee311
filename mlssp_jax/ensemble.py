"""A fold ensemble as one compiled call: parameters stacked along a leading axis, ``vmap``.

Every fold of a run has the same architecture, so their parameter trees are stacked into one
tree whose leaves carry a leading fold axis ``(F, ...)``; one jitted function maps the network
over that axis (:func:`jax.vmap`) and averages the probabilities on the device. Test-time
augmentation (TTA) runs inside the same call, each view made and undone on the device: the
8 mirrorings of a batch of B windows go through the network as one batch of 8B, and the 48
symmetries are a ``fori_loop`` over the 6 axis permutations (:func:`jax.lax.switch` over
transposes) of those 8, so the network is traced once whatever the number of views.

TTA modes (:data:`TTA_MODES`): ``"none"``; ``"flips"``, the 8 mirrorings along any subset
of the three axes (nnU-Net's test-time mirroring); ``"all"``, the 48 cube symmetries
(permutations x flips) the paper trains with. Cost: 1, 8 and 48 network evaluations per
window and fold.

The windows call evaluates the segmentation branch only (the classification branch is not
traced); the VOI call evaluates every output once, without TTA, for the AVM probability.
Both follow :data:`mlssp_jax.inference.PredictFn`: images ``(B, S, S, S, 1)`` float32 ->
``{"seg_prob": (B, S, S, S, 1) | None, "cls_prob": (B,) | None}``; ``S`` is any multiple of
16 (the network is fully convolutional).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mlssp_jax import augment, models
from mlssp_jax.config import ModelConfig

TTA_MODES = {"none": 1, "flips": 8, "all": augment.NUM_SYMMETRIES}  # mode -> views


def stack_params(params_list: Sequence[Any]) -> Any:
    """One parameter tree with a leading fold axis ``(F, ...)`` on every leaf."""
    if not params_list:
        raise ValueError("ensemble of no models")
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *params_list)


def view(windows: jax.Array, index: int) -> jax.Array:
    """Cube symmetry ``index`` (:func:`mlssp_jax.augment.symmetry`) of windows (B, S, S, S)."""
    perm, flips = augment.symmetry_parts(index)
    moved = jnp.transpose(windows, (0, *(1 + a for a in perm)))
    return jnp.flip(moved, tuple(1 + a for a in flips)) if flips else moved


def unview(windows: jax.Array, index: int) -> jax.Array:
    """Undo :func:`view` ``index`` on windows (B, S, S, S)."""
    perm, flips = augment.symmetry_parts(index)
    back = jnp.flip(windows, tuple(1 + a for a in flips)) if flips else windows
    return jnp.transpose(back, (0, *(1 + int(a) for a in np.argsort(perm))))


def _flips_mean(seg_fn: Any, windows: jax.Array) -> jax.Array:
    """Mean of the 8 mirrorings, undone: the 8 views go through ``seg_fn`` as one batch (8B)."""
    flips = augment.NUM_SYMMETRIES // 6  # indices 0..7: identity permutation, every flip
    out = seg_fn(jnp.concatenate([view(windows, k) for k in range(flips)]))
    return sum(unview(part, k) for k, part in enumerate(jnp.split(out, flips))) / flips


def tta_mean(seg_fn: Any, windows: jax.Array, tta: str) -> jax.Array:
    """Mean over the ``tta`` views of ``unview(seg_fn(view(windows)))``; windows (B, S, S, S).

    ``seg_fn`` maps (B', S, S, S) to (B', S, S, S) for any B'. The 8 mirrorings of a batch
    are one call of batch 8B (one large call is faster than 8 small ones); ``"all"`` loops
    (``fori_loop``, ``seg_fn`` traced once) over the 6 axis permutations, each with its 8
    mirrorings: symmetry ``8 p + f`` is mirroring ``f`` after permutation ``p``.
    """
    count = TTA_MODES[tta]
    if count == 1:
        return seg_fn(windows)
    if count == 8:
        return _flips_mean(seg_fn, windows)
    perms = [functools.partial(view, index=8 * p) for p in range(count // 8)]
    unperms = [functools.partial(unview, index=8 * p) for p in range(count // 8)]

    def body(p, total):
        moved = jax.lax.switch(p, perms, windows)
        return total + jax.lax.switch(p, unperms, _flips_mean(seg_fn, moved))

    return jax.lax.fori_loop(0, len(perms), body, jnp.zeros_like(windows)) / len(perms)


@functools.lru_cache(maxsize=8)
def _compiled(model_cfg: ModelConfig, tta: str) -> tuple[Any, Any]:
    """Jitted (windows_fn, voi_fn) of ``(stacked params, images (B, S, S, S, 1))``."""
    net = models.build_model(model_cfg)
    seg_net = net.clone(cls=False)

    def seg_prob(stacked: Any, windows: jax.Array) -> jax.Array:  # (B, S, S, S), fold mean
        def one(params):
            return jax.nn.sigmoid(seg_net.apply({"params": params}, windows[..., None])["seg"])
        return jnp.mean(jax.vmap(one)(stacked), axis=0)[..., 0]

    def windows_fn(stacked: Any, images: jax.Array) -> dict:
        prob = tta_mean(functools.partial(seg_prob, stacked), images[..., 0], tta)
        return {"seg_prob": prob[..., None], "cls_prob": None}

    def voi_fn(stacked: Any, images: jax.Array) -> dict:
        def one(params):
            out = net.apply({"params": params}, images)
            return {k: None if v is None else jax.nn.sigmoid(v) for k, v in out.items()}
        out = jax.vmap(one)(stacked)
        return {"seg_prob": None if out["seg"] is None else jnp.mean(out["seg"], axis=0),
                "cls_prob": None if out["cls"] is None else jnp.mean(out["cls"], axis=0)}

    return jax.jit(windows_fn), jax.jit(voi_fn)


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """The folds' parameters stacked on the device, and the two calls that use them.

    ``windows``: segmentation probability averaged over folds and TTA views (``cls_prob``
    None), for sliding windows; ``voi``: every output averaged over folds, no TTA.
    """

    model_cfg: ModelConfig
    params: Any  # leaves (F, ...)
    tta: str = "none"

    @property
    def folds(self) -> int:
        return int(jax.tree.leaves(self.params)[0].shape[0])

    def windows(self, images: np.ndarray) -> dict:
        return _compiled(self.model_cfg, self.tta)[0](self.params, images)

    def voi(self, images: np.ndarray) -> dict:
        return _compiled(self.model_cfg, self.tta)[1](self.params, images)

    def lower_windows(self, batch: int, window: int) -> Any:
        """The windows call lowered for ``(batch, window^3)`` images (for XLA's cost analysis)."""
        images = jax.ShapeDtypeStruct((batch, window, window, window, 1), jnp.float32)
        return _compiled(self.model_cfg, self.tta)[0].lower(self.params, images)


def make_ensemble(model_cfg: ModelConfig, params_list: Sequence[Any], tta: str = "none"
                  ) -> Ensemble:
    """An :class:`Ensemble` of the given parameter trees (one per fold) on the default device."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {sorted(TTA_MODES)}, got {tta!r}")
    return Ensemble(model_cfg, jax.device_put(stack_params(params_list)), tta)
