"""Skull stripping: the brain mask of a head CT resampled to an isotropic RAS grid, in HU.

Steps (scipy.ndimage only; every threshold and margin is a ``strip_*`` field of
:class:`~mlssp_jax.config.DataConfig`, HU and mm, converted to voxels through the spacing):

1. Bone = HU >= ``strip_bone_hu``, closed with a ball of ``strip_bone_closing_mm`` to seal
   thin gaps. The intracranial cavity = what the bone encloses, filled slice by slice (axial)
   and in 3-D, with the edge of the scanned field of view acting as a wall where the slab
   cuts the head (partial coverage, gantry tilt). Air (sinuses, mastoid cells) is below
   ``strip_brain_min_hu`` and never brain.
2. Hematoma cores: cavity voxels whose HU, smoothed by a Gaussian of ``strip_smooth_mm``,
   lies in ``[strip_hematoma_min_hu, strip_hematoma_max_hu)`` (a clot, 50-90 HU, denser where
   it retracts or calcifies), opened by ``strip_core_mm`` (the thin partial-volume bands
   between bone and brain vanish; a clot does not). Voxels within
   ``strip_core_mm + strip_protect_mm`` of a core are protected.
3. The skull = bone components touching the outside of the cavity (calcifications inside the
   brain are not). Removed = the skull grown geodesically through unprotected bone-like voxels
   (HU >= ``strip_bone_like_hu``) by up to ``strip_rim_mm``: the partial-volume rim of the
   inner table, the tangentially cut vertex and the skull base, but never a voxel below
   ``strip_bone_like_hu`` (brain, blood) nor a bone-like voxel of a protected clot.
4. Brain = the largest component of the cavity's soft tissue (HU > ``strip_brain_min_hu``)
   minus the removed voxels, holes filled (ventricles, calcifications), grown - only where
   protected - by up to ``strip_rim_grow_mm`` through the partial-volume rim below
   ``strip_rim_max_hu``, so a hematoma against the inner table keeps its outermost voxels
   (half blood, half bone: several hundred HU on thick slices).

:func:`strip_report` measures a result against a true lesion mask (bone-like mL left more
than a distance from the lesion, brain mL, fraction of the lesion kept).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from mlssp_jax import masks
from mlssp_jax.config import DataConfig

STRIP_FIELDS = ("strip_bone_hu", "strip_bone_closing_mm", "strip_brain_min_hu",
                "strip_bone_like_hu", "strip_rim_mm", "strip_hematoma_min_hu",
                "strip_hematoma_max_hu", "strip_smooth_mm", "strip_core_mm", "strip_protect_mm",
                "strip_rim_grow_mm", "strip_rim_max_hu")


def params(data_cfg: DataConfig) -> dict[str, float]:
    """The stripping parameters of ``data_cfg`` (part of the preprocessing cache key)."""
    return {name: getattr(data_cfg, name) for name in STRIP_FIELDS}


def _ball(radius: int) -> np.ndarray:
    grid = np.indices((2 * radius + 1,) * 3) - radius
    return (grid**2).sum(axis=0) <= radius**2


def _voxels(mm: float, spacing_mm: float, minimum: int = 0) -> int:
    return max(minimum, round(mm / spacing_mm))


def _fill(mask: np.ndarray) -> np.ndarray:
    """Holes filled slice by slice in the axial plane (axis 2) and in 3-D."""
    axial = np.zeros((3, 3, 3), dtype=bool)
    axial[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_fill_holes(mask, axial) | ndimage.binary_fill_holes(mask)


def _distance_within(mask: np.ndarray, mm: float, spacing_mm: float) -> np.ndarray:
    """Bool: voxels within ``mm`` (Euclidean) of ``mask``; all False if ``mask`` is empty."""
    if not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask, sampling=spacing_mm) <= mm


def _bone_and_cavity(hu: np.ndarray, fov: np.ndarray, cfg: DataConfig):
    """``(bone, inside)``: closed bone (+ the FOV wall) and everything it encloses."""
    radius = _voxels(cfg.strip_bone_closing_mm, cfg.spacing_mm)
    bone = hu >= cfg.strip_bone_hu
    if radius > 0:
        bone = ndimage.binary_closing(np.pad(bone, radius), _ball(radius))
        bone = bone[(slice(radius, -radius),) * 3]
    bone = bone | ~fov
    return bone, _fill(bone)


def _protected(hu: np.ndarray, cavity: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Bool: voxels within ``strip_core_mm + strip_protect_mm`` of a hematoma core."""
    smooth = ndimage.gaussian_filter(hu, cfg.strip_smooth_mm / cfg.spacing_mm)
    dense = cavity & (smooth >= cfg.strip_hematoma_min_hu) & (smooth < cfg.strip_hematoma_max_hu)
    core_mm = cfg.strip_core_mm
    if core_mm > 0:
        dense = ndimage.distance_transform_edt(dense, sampling=cfg.spacing_mm) > core_mm
    return _distance_within(dense, core_mm + cfg.strip_protect_mm, cfg.spacing_mm)


def _skull_rim(hu: np.ndarray, bone: np.ndarray, inside: np.ndarray,
               protected: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Bool: the skull and the bone-like voxels connected to it within ``strip_rim_mm``."""
    labels, _ = ndimage.label(bone)
    touching = np.unique(labels[bone & ndimage.binary_dilation(~inside)])
    skull = np.isin(labels, touching[touching > 0])
    steps = _voxels(cfg.strip_rim_mm, cfg.spacing_mm)
    if steps == 0:
        return skull
    like = (hu >= cfg.strip_bone_like_hu) & ~protected
    return ndimage.binary_dilation(skull, np.ones((3, 3, 3), bool), iterations=steps,
                                   mask=like | skull)


def skull_strip(hu: np.ndarray, fov: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Brain mask (bool, same shape) of a head CT in HU on an isotropic RAS grid (axis 2 axial).

    ``hu`` (I, J, K) float HU sampled every ``cfg.spacing_mm``; ``fov`` (bool, same shape)
    marks the scanned field of view. See the module docstring for the steps.
    """
    bone, inside = _bone_and_cavity(hu, fov, cfg)
    cavity = inside & ~bone
    protected = _protected(hu, cavity, cfg)
    removed = _skull_rim(hu, bone, inside, protected, cfg)
    brain = masks.largest_component(cavity & ~removed & (hu > cfg.strip_brain_min_hu))
    brain = _fill(brain) & ~removed & fov
    rim = protected & fov & (hu > cfg.strip_brain_min_hu) & (hu < cfg.strip_rim_max_hu)
    steps = _voxels(cfg.strip_rim_grow_mm, cfg.spacing_mm, minimum=1)
    return ndimage.binary_dilation(brain, iterations=steps, mask=rim | brain)


def strip_report(bone_like: np.ndarray, brain: np.ndarray, lesion: np.ndarray,
                 spacing_mm: float, away_mm: float = 5.0) -> dict[str, float]:
    """How clean a strip is, against the true lesion mask; bool arrays (I, J, K) on one grid.

    ``bone_like`` marks bone-like voxels (e.g. HU >= 100, the top of the 50/100 window).
    Returns ``bone_ml``: bone-like brain voxels farther than ``away_mm`` from the lesion (mL),
    ``brain_ml`` (mL) and ``lesion_kept`` (lesion voxels in the brain / lesion voxels; 1.0
    without a lesion).
    """
    voxel_ml = spacing_mm**3 / 1000.0
    lesion = lesion.astype(bool)
    brain = brain.astype(bool)
    near = _distance_within(lesion, away_mm, spacing_mm)
    n_lesion = int(lesion.sum())
    kept = float((lesion & brain).sum()) / n_lesion if n_lesion else 1.0
    return {"bone_ml": float((brain & bone_like & ~near).sum()) * voxel_ml,
            "brain_ml": float(brain.sum()) * voxel_ml, "lesion_kept": kept}
