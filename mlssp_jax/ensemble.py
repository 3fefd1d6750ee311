"""A fold ensemble: one jitted network called for every fold in turn, probabilities averaged.

Every fold of a run has the same architecture, so one jitted function serves them all; each
batch of windows goes through the folds in turn and their probabilities are averaged.
Measured on this CPU, five separate calls beat the folds stacked along a leading axis and
``jax.vmap``-ed in one jit (0.66 s against 0.92-0.97 s per batch of 4 32^3 windows: the
oneDNN convolutions are FFI calls, which ``vmap`` runs as a loop) and the folds unrolled in
one jit (0.85 s); see README.
Test-time augmentation (TTA) runs inside each call, each view made and undone on the device:
the 8 mirrorings of a batch of B windows go through the network as one batch of 8B, and the
48 symmetries are a ``fori_loop`` over the 6 axis permutations (:func:`jax.lax.switch` over
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
    """Jitted (windows_fn, voi_fn) of ``(one fold's params, its segmentation logit offset (),
    images (B, S, S, S, 1))``."""
    net = models.build_model(model_cfg)
    seg_net = net.clone(cls=False)

    def seg_prob(params: Any, offset: jax.Array, windows: jax.Array) -> jax.Array:  # (B, S, S, S)
        logits = seg_net.apply({"params": params}, windows[..., None])["seg"][..., 0]
        return jax.nn.sigmoid(logits - offset)

    def windows_fn(params: Any, offset: jax.Array, images: jax.Array) -> jax.Array:
        return tta_mean(functools.partial(seg_prob, params, offset), images[..., 0],
                        tta)[..., None]  # (B, S, S, S, 1)

    def voi_fn(params: Any, offset: jax.Array, images: jax.Array) -> dict:
        out = net.apply({"params": params}, images)
        if out["seg"] is not None:
            out["seg"] = out["seg"] - offset
        return {f"{k}_prob": None if v is None else jax.nn.sigmoid(v) for k, v in out.items()}

    return jax.jit(windows_fn), jax.jit(voi_fn)


def _mean(outputs: list) -> np.ndarray | None:
    return None if outputs[0] is None else np.mean(outputs, axis=0, dtype=np.float32)


def _fold_outputs(call: Any, params: tuple, offsets: tuple, images: np.ndarray) -> list:
    """``call(p, offset, images)`` for each fold in turn, each finished before the next starts
    (on 2 CPU cores, folds running at once oversubscribe the cores: 1.8x slower, measured)."""
    images = jax.device_put(images)
    return [jax.device_get(call(p, o, images)) for p, o in zip(params, offsets, strict=True)]


def logit_offset(fold_threshold: float, threshold: float) -> float:
    """The segmentation logit offset that moves a fold's own ``fold_threshold`` to the
    ensemble's ``threshold``: ``sigmoid(logit - offset) >= threshold`` exactly where
    ``sigmoid(logit) >= fold_threshold``."""
    def logit(p: float) -> float:
        return float(np.log(p) - np.log1p(-p))
    return logit(fold_threshold) - logit(threshold)


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """The folds' parameters on the device, and the two calls that use them.

    ``windows``: segmentation probability averaged over folds and TTA views (``cls_prob``
    None), for sliding windows; ``voi``: every output averaged over folds, no TTA.
    ``offsets``: one segmentation logit offset per fold (:func:`logit_offset`), subtracted
    before the sigmoid, so that folds which chose different thresholds on their inner
    validation are averaged on a common scale (0: the fold's probabilities as trained).
    ``calibrations``: one :class:`~mlssp_jax.calibration.Calibration` per fold, applied to that
    fold's classification probability before the folds are averaged (empty: none).
    """

    model_cfg: ModelConfig
    params: tuple  # one parameter tree per fold
    tta: str = "none"
    offsets: tuple = ()  # one float per fold; empty: all 0
    calibrations: tuple = ()  # one Calibration per fold; empty: the identity

    @property
    def folds(self) -> int:
        return len(self.params)

    def _offsets(self) -> tuple:
        return tuple(np.float32(o) for o in (self.offsets or (0.0,) * self.folds))

    def windows(self, images: np.ndarray) -> dict:
        outs = _fold_outputs(_compiled(self.model_cfg, self.tta)[0], self.params,
                             self._offsets(), images)
        return {"seg_prob": _mean(outs), "cls_prob": None}

    def voi(self, images: np.ndarray) -> dict:
        outs = _fold_outputs(_compiled(self.model_cfg, self.tta)[1], self.params,
                             self._offsets(), images)
        cls = [o["cls_prob"] for o in outs]
        if cls[0] is not None and self.calibrations:
            cls = [cal.apply(p).astype(np.float32)
                   for cal, p in zip(self.calibrations, cls, strict=True)]
        return {"seg_prob": _mean([o["seg_prob"] for o in outs]), "cls_prob": _mean(cls)}

    def lower_windows(self, batch: int, window: int) -> Any:
        """One fold's windows call lowered for ``(batch, window^3)`` images (for XLA's cost
        analysis; the ensemble costs ``folds`` times that)."""
        images = jax.ShapeDtypeStruct((batch, window, window, window, 1), jnp.float32)
        return _compiled(self.model_cfg, self.tta)[0].lower(self.params[0], np.float32(0),
                                                            images)


def make_ensemble(model_cfg: ModelConfig, params_list: Sequence[Any], tta: str = "none",
                  offsets: Sequence[float] = (), calibrations: Sequence[Any] = ()) -> Ensemble:
    """An :class:`Ensemble` of the given parameter trees (one per fold) on the default device,
    with one segmentation logit offset and one classification calibration per fold (empty:
    none)."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {sorted(TTA_MODES)}, got {tta!r}")
    if not params_list:
        raise ValueError("ensemble of no models")
    if offsets and len(offsets) != len(params_list):
        raise ValueError(f"{len(offsets)} offsets for {len(params_list)} folds")
    if calibrations and len(calibrations) != len(params_list):
        raise ValueError(f"{len(calibrations)} calibrations for {len(params_list)} folds")
    return Ensemble(model_cfg, tuple(jax.device_put(p) for p in params_list), tta,
                    tuple(float(o) for o in offsets), tuple(calibrations))
