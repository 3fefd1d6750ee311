"""Training augmentation of a VOI: the 48 cube symmetries, optional scipy random transforms,
and (before windowing, :func:`hu_transform`) a scanner's look in HU.

An example is a dict ``{"image": (S, S, S) float32 in [0, 1], "mask": (S, S, S) 0/1, "label"}``
on a 1 mm grid. Every transform applies identically to image and mask, keeps the mask
binary, and draws its randomness from the ``np.random.Generator`` it is given (no global
random state), so the loader can make each sample a pure function of (seed, epoch, index).

The paper's 48 variants (3 x 8 x 2: rotations, flips, transposition) are the 48 symmetries
of the cube: an axis permutation (6) followed by flips of any subset of the axes (8). They
form a group; :func:`symmetry` applies element ``index`` (0 is the identity),
:func:`compose` and :func:`inverse` give the group's product and inverses.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import numpy as np
from scipy import ndimage

from mlssp_jax.config import AugmentConfig

NUM_SYMMETRIES = 48
_PERMUTATIONS = tuple(itertools.permutations(range(3)))  # identity first


def symmetry_parts(index: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The axis permutation and the flipped axes of symmetry ``index`` (perm * 8 + flip bits)."""
    if not 0 <= index < NUM_SYMMETRIES:
        raise ValueError(f"symmetry index must be in 0..47, got {index}")
    perm = _PERMUTATIONS[index // 8]
    flips = tuple(axis for axis in range(3) if (index % 8) >> axis & 1)
    return perm, flips


def symmetry(index: int, volume: np.ndarray) -> np.ndarray:
    """Apply cube symmetry ``index`` (0..47) to the first three axes of a cubic ``volume``.

    Transposes the spatial axes by the permutation, then flips the chosen axes. Trailing
    axes (e.g. channels) are untouched. Returns a numpy view where possible (no copy).
    """
    perm, flips = symmetry_parts(index)
    moved = np.transpose(volume, perm + tuple(range(3, volume.ndim)))
    return np.flip(moved, flips) if flips else moved


@functools.cache
def _matrix(index: int) -> np.ndarray:
    """Signed permutation matrix M of symmetry ``index``: out[M @ y] = in[y] (centred coords)."""
    perm, flips = symmetry_parts(index)
    matrix = np.zeros((3, 3), dtype=np.int64)
    matrix[np.arange(3), perm] = 1
    for axis in flips:
        matrix[axis] *= -1
    return matrix


@functools.cache
def _index_of_matrix() -> dict[bytes, int]:
    return {_matrix(i).tobytes(): i for i in range(NUM_SYMMETRIES)}


def inverse(a: int) -> int:
    """Index of the symmetry undoing ``a``: ``symmetry(inverse(a), symmetry(a, v)) == v``."""
    return _index_of_matrix()[np.ascontiguousarray(_matrix(a).T).tobytes()]


def random_affine_matrix(rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """A random 3x3 output->input voxel map: rotation (each axis, +-``rotate_deg``) x scale.

    The isotropic scale factor is drawn in ``1 +- scale_fraction``.
    """
    angles = np.deg2rad(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg, size=3))
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        a, b = [ax for ax in range(3) if ax != axis]
        rotation = np.eye(3)
        cos, sin = np.cos(angle), np.sin(angle)
        rotation[[a, a, b, b], [a, b, a, b]] = cos, -sin, sin, cos
        matrix = rotation @ matrix
    scale = rng.uniform(1.0 - cfg.scale_fraction, 1.0 + cfg.scale_fraction)
    return matrix / scale


def voxels(length_mm: float, spacing_mm: float) -> float:
    """A length in mm as a number of voxels of an isotropic grid of ``spacing_mm``."""
    return length_mm / spacing_mm


def jitter_voxels(cfg: AugmentConfig, spacing_mm: float) -> int:
    """``voi_jitter_mm`` as whole voxels (rounded down): the largest VOI centre offset."""
    return int(voxels(cfg.voi_jitter_mm, spacing_mm) + 1e-9)


def elastic_displacement(shape: tuple[int, ...], rng: np.random.Generator,
                         cfg: AugmentConfig, spacing_mm: float) -> np.ndarray:
    """A smooth random displacement field (3, *shape) in voxels of ``spacing_mm``.

    White noise smoothed by a Gaussian of ``elastic_sigma_mm``, scaled so each component
    has a standard deviation of ``elastic_alpha_mm`` (both converted to voxels). The field
    is drawn on a grid ``sigma / 2`` times coarser and upsampled linearly: it is smooth at
    that scale anyway, and smoothing the coarse noise is far cheaper than smoothing
    full-size noise.
    """
    sigma, alpha = (voxels(cfg.elastic_sigma_mm, spacing_mm),
                    voxels(cfg.elastic_alpha_mm, spacing_mm))
    step = max(1, int(sigma // 2))
    coarse_shape = tuple(-(-n // step) + 1 for n in shape)
    zoom = np.asarray(shape) / np.asarray(coarse_shape)
    fields = []
    for _ in range(3):
        coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32),
                                         sigma / step, mode="reflect")
        coarse *= alpha / max(float(coarse.std()), 1e-12)
        fields.append(ndimage.zoom(coarse, zoom, order=1, mode="nearest", grid_mode=True))
    return np.stack(fields)


def _sample_coordinates(shape: tuple[int, ...], rng: np.random.Generator,
                        cfg: AugmentConfig, spacing_mm: float) -> np.ndarray:
    """Input voxel coordinates (3, *shape) per output voxel: affine about the centre + elastic."""
    centre = (np.asarray(shape, dtype=np.float32) - 1.0) / 2.0
    grid = np.indices(shape, dtype=np.float32) - centre[:, None, None, None]
    matrix = random_affine_matrix(rng, cfg) if cfg.random_affine else np.eye(3)
    coords = np.tensordot(matrix.astype(np.float32), grid, axes=1) + centre[:, None, None, None]
    if cfg.elastic:
        coords += elastic_displacement(shape, rng, cfg, spacing_mm)
    return coords


def spatial_transform(example: dict[str, Any], rng: np.random.Generator,
                      cfg: AugmentConfig, spacing_mm: float) -> dict[str, Any]:
    """Random rotation/scale about the VOI centre and/or elastic deformation, one resampling.

    Image: linear interpolation, background 0 outside. Mask: resampled as float, then
    thresholded at 0.5, so it stays binary and aligned with the image. With only the
    affine part this is one ``ndimage.affine_transform`` per array; with elastic, one
    ``ndimage.map_coordinates`` over the combined coordinates.
    """
    image, mask = example["image"], example["mask"]
    if cfg.elastic:
        coords = _sample_coordinates(image.shape, rng, cfg, spacing_mm)
        warp = functools.partial(ndimage.map_coordinates, coordinates=coords, order=1,
                                 mode="constant", cval=0.0)
    else:
        matrix = random_affine_matrix(rng, cfg)
        centre = (np.asarray(image.shape) - 1.0) / 2.0
        warp = functools.partial(ndimage.affine_transform, matrix=matrix,
                                 offset=centre - matrix @ centre, order=1, mode="constant",
                                 cval=0.0)
    new_image = warp(np.asarray(image, dtype=np.float32)).astype(np.float32)
    new_mask = (warp(np.asarray(mask, dtype=np.float32)) >= 0.5).astype(mask.dtype)
    return {**example, "image": new_image, "mask": new_mask}


def intensity_transform(image: np.ndarray, rng: np.random.Generator,
                        cfg: AugmentConfig) -> np.ndarray:
    """Gamma (exponent ``exp(U(-gamma_range, gamma_range))``), Gaussian noise, clip to [0, 1]."""
    gamma = np.exp(rng.uniform(-cfg.gamma_range, cfg.gamma_range))
    noisy = np.power(np.clip(image, 0.0, 1.0), gamma) + rng.normal(0.0, cfg.noise_std, image.shape)
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


def _masked_filter(hu: np.ndarray, brain: np.ndarray, sigma_vox) -> np.ndarray:
    """Gaussian filter of ``hu`` inside ``brain`` only (normalised convolution): the
    background outside the skull-stripped brain does not bleed into it."""
    weight = ndimage.gaussian_filter(brain.astype(np.float32), sigma_vox, mode="nearest")
    blurred = ndimage.gaussian_filter(np.where(brain, hu, 0.0).astype(np.float32), sigma_vox,
                                      mode="nearest")
    return np.where(brain, blurred / np.maximum(weight, 1e-6), hu).astype(np.float32)


def point_spread(hu: np.ndarray, brain: np.ndarray, rng: np.random.Generator,
                 cfg: AugmentConfig, spacing_mm: float) -> np.ndarray:
    """A random blur (sigma U(0, ``blur_sigma_max_mm``)) or sharpening (unsharp mask of
    amount U(0, ``sharpen_max``), sigma 1 voxel), one of the two enabled, inside the brain."""
    sharpen = cfg.sharpen_max > 0 and (cfg.blur_sigma_max_mm == 0 or rng.random() < 0.5)
    if sharpen:
        amount = rng.uniform(0.0, cfg.sharpen_max)
        return hu + amount * (hu - _masked_filter(hu, brain, 1.0))
    sigma_vox = rng.uniform(0.0, cfg.blur_sigma_max_mm) / spacing_mm
    return _masked_filter(hu, brain, sigma_vox) if sigma_vox > 0 else hu


def slice_thickness(hu: np.ndarray, brain: np.ndarray, rng: np.random.Generator,
                    cfg: AugmentConfig, spacing_mm: float) -> np.ndarray:
    """Through-plane blur along axis 2 (superior): a Gaussian with the variance of a slice
    profile of thickness U(0, ``slice_thickness_max_mm``) (box of width t: sd t / sqrt 12)."""
    sigma_vox = rng.uniform(0.0, cfg.slice_thickness_max_mm) / np.sqrt(12.0) / spacing_mm
    return _masked_filter(hu, brain, (0.0, 0.0, sigma_vox)) if sigma_vox > 0 else hu


def hu_transform(example: dict[str, Any], rng: np.random.Generator,
                 cfg: AugmentConfig) -> dict[str, Any]:
    """A scanner's look on the skull-stripped HU, before windowing (each part off at 0).

    ``example``: ``hu`` (S, S, S) HU, ``brain`` (S, S, S) bool, ``spacing_mm``. In order:
    point spread, slice thickness, contrast ``hu * U(1 +- hu_scale_fraction)`` about 0 HU
    plus ``U(+-hu_offset)`` HU, Gaussian noise of sd U(0, ``hu_noise_max``) HU. Voxels
    outside the brain are unchanged (windowing zeroes them). No draw for a part that is off.
    """
    hu, brain, spacing = np.asarray(example["hu"], np.float32), example["brain"], \
        float(example["spacing_mm"])
    if cfg.blur_sigma_max_mm > 0 or cfg.sharpen_max > 0:
        hu = point_spread(hu, brain, rng, cfg, spacing)
    if cfg.slice_thickness_max_mm > 0:
        hu = slice_thickness(hu, brain, rng, cfg, spacing)
    if cfg.hu_scale_fraction > 0:
        hu = np.where(brain, hu * rng.uniform(1 - cfg.hu_scale_fraction,
                                              1 + cfg.hu_scale_fraction), hu)
    if cfg.hu_offset > 0:
        hu = np.where(brain, hu + rng.uniform(-cfg.hu_offset, cfg.hu_offset), hu)
    if cfg.hu_noise_max > 0:
        noise = rng.normal(0.0, rng.uniform(0.0, cfg.hu_noise_max), hu.shape)
        hu = np.where(brain, hu + noise, hu)
    return {**example, "hu": hu.astype(np.float32)}


def random_transform(example: dict[str, Any], rng: np.random.Generator,
                     cfg: AugmentConfig, spacing_mm: float) -> dict[str, Any]:
    """Augment ``{"image", "mask", "label", ...}``: a random cube symmetry, then the enabled scipy
    transforms (``random_affine``/``elastic``: one resampling; ``intensity``: image only).

    Arrays are (S, S, S) on an isotropic grid of ``spacing_mm`` (``data.spacing_mm``); the
    result holds contiguous copies, other keys pass through.
    """
    out = dict(example)
    if cfg.symmetries:
        index = int(rng.integers(NUM_SYMMETRIES))
        out["image"], out["mask"] = symmetry(index, out["image"]), symmetry(index, out["mask"])
    if cfg.random_affine or cfg.elastic:
        out = spatial_transform(out, rng, cfg, spacing_mm)
    if cfg.intensity:
        out["image"] = intensity_transform(out["image"], rng, cfg)
    out["image"] = np.ascontiguousarray(out["image"], dtype=np.float32)
    out["mask"] = np.ascontiguousarray(out["mask"])
    return out
