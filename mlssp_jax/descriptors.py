"""Lesion descriptors: a few interpretable numbers measured from a lesion mask and its scan.

Inputs are arrays on the preprocessed grid (:mod:`mlssp_jax.preprocess`), all ``(D, H, W)``:
a lesion ``mask`` (predicted or true, nonzero = lesion), the ``brain`` mask and the density,
either in HU (``hu``) or as the windowed ``image`` in [0, 1]. The window is inverted
(``hu = level - width / 2 + image * width``: HU 0..100 for WL 50 / WW 100), so densities
outside the window are clipped to its ends (a 120 HU calcification reads 100 HU, a -10 HU
CSF voxel 0 HU); pass ``hu`` when the unclipped values are at hand.

Descriptors (:data:`DESCRIPTOR_NAMES`; ``None`` when undefined, e.g. for an empty mask):

- ``volume_ml``, ``log_volume_ml`` (natural log of mL);
- ``centroid_depth_mm``: the distance from the lesion's centroid (rounded to the nearest
  voxel) to the nearest voxel outside the brain, i.e. the depth below the brain surface
  (0 if the centroid is outside the brain); ``min_depth_mm``: the same at the lesion voxel
  closest to the surface;
- ``solidity``: lesion volume / volume of the convex hull of its voxels' corners, in (0, 1]
  (1 for a box, lower for lobulated or tangled shapes: the surface irregularity);
- ``hu_mean``, ``hu_std``: the density inside the lesion (HU);
- ``rim_hu_mean``: the mean density of the brain voxels 0 < d <= ``rim_mm`` outside the
  lesion (edema is darker than brain);
- ``vessel_fraction``: the share of brain voxels ``vessel_min_mm`` < d <= ``vessel_max_mm``
  outside the lesion whose density is in [``vessel_min_hu``, ``vessel_max_hu``] (bright
  feeding arteries and draining veins around an AVM).

Relative descriptors, which the classifier uses (:data:`~mlssp_jax.descriptor_classifier.
DEFAULT_FEATURES`): absolute HU shift with the scanner's calibration and the patient, and a
mean over a predicted mask's boundary mixes in whatever the mask's edge touches (bone on the
inner table, calcification, partial volume), so these count only soft-tissue voxels
(``soft_min_hu`` .. ``soft_max_hu``), use medians, and are taken against the scan's own
parenchyma:

- ``brain_hu_median``: the median HU of the soft brain voxels more than
  ``parenchyma_gap_mm`` from the lesion (the reference; on the whole volume);
- ``hu_contrast``: the lesion's median soft HU minus ``brain_hu_median``;
- ``core_hu_mad``: the spread of the lesion's core (its soft voxels deeper than ``core_mm``
  below the lesion's boundary, so the partial-volume edge is left out), as 1.4826 x the
  median absolute deviation (HU; the standard deviation for Gaussian values); None with
  fewer than :data:`MIN_CORE_VOXELS` core voxels (AVM clots are heterogeneous);
- ``noise_hu``: the scan's noise near the lesion, 1.4826 x the median absolute deviation of
  the residual of a 3 x 3 x 3 median filter over the soft brain voxels
  ``parenchyma_gap_mm`` < d <= ``noise_shell_mm`` from the lesion;
- ``core_texture_hu``: ``core_hu_mad`` with that noise taken out,
  sqrt(max(core_hu_mad^2 - noise_hu^2, 0)): the clot's own heterogeneity whatever the
  scanner's noise;
- ``rim_contrast``: the median soft HU of the 0-``rim_mm`` rim minus ``brain_hu_median``;
- ``vessel_contrast_fraction``: the share of the soft brain voxels of the vessel shell at
  least ``vessel_above_brain_hu`` denser than ``brain_hu_median``.

Distances d are Euclidean in mm (``spacing_mm`` per axis) from the nearest lesion voxel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from mlssp_jax import masks
from mlssp_jax.config import Config, DescriptorConfig

DESCRIPTOR_NAMES = ("volume_ml", "log_volume_ml", "centroid_depth_mm", "min_depth_mm",
                    "solidity", "hu_mean", "hu_std", "rim_hu_mean", "vessel_fraction",
                    "brain_hu_median", "hu_contrast", "noise_hu", "core_hu_mad",
                    "core_texture_hu", "rim_contrast", "vessel_contrast_fraction")
MIN_CORE_VOXELS = 8  # fewer core voxels: no core_hu_mad
MAD_TO_SD = 1.4826   # median absolute deviation -> standard deviation of a Gaussian


def hu_from_window(image: np.ndarray, level_hu: float, width_hu: float) -> np.ndarray:
    """Invert :func:`mlssp_jax.preprocess.window`: [0, 1] -> HU ``level -+ width / 2``, float32.

    Values the window clipped stay at its ends (see the module docstring).
    """
    low = level_hu - width_hu / 2.0
    return (low + np.asarray(image, np.float32) * width_hu).astype(np.float32)


def _spacing(spacing_mm: float | Sequence[float]) -> np.ndarray:
    return np.broadcast_to(np.asarray(spacing_mm, float), (3,)).copy()


def depth_below_surface_mm(brain: np.ndarray, spacing_mm: float | Sequence[float]) -> np.ndarray:
    """(D, H, W) float distance (mm) of each brain voxel to the nearest non-brain voxel.

    The array's border counts as outside the brain; non-brain voxels are 0.
    """
    padded = np.pad(np.asarray(brain).astype(bool), 1)
    depth = ndimage.distance_transform_edt(padded, sampling=_spacing(spacing_mm))
    return depth[1:-1, 1:-1, 1:-1]


def solidity(mask: np.ndarray, spacing_mm: float | Sequence[float] = 1.0,
             origin: Sequence[int] = (0, 0, 0)) -> float | None:
    """Volume / convex-hull volume of the union of the voxel cubes of ``mask``; None if empty.

    The hull is that of the 8 corners of each surface voxel (interior voxels add no corner
    outside it), so it contains every cube and the ratio is in (0, 1]. ``origin``: the index
    of ``mask[0, 0, 0]`` in a larger array it was cut from (the hull is then computed on the
    same coordinates, so a crop gives the very same float).
    """
    mask = np.asarray(mask).astype(bool)
    if not mask.any():
        return None
    spacing = _spacing(spacing_mm)
    surface = mask & ~ndimage.binary_erosion(mask, border_value=0)
    centres = (np.argwhere(surface) + np.asarray(origin)).astype(float)  # (N, 3) voxel indices
    corners = np.array([[i, j, k] for i in (-0.5, 0.5) for j in (-0.5, 0.5) for k in (-0.5, 0.5)])
    points = np.unique((centres[:, None, :] + corners[None]).reshape(-1, 3), axis=0) * spacing
    try:
        hull_mm3 = ConvexHull(points).volume
    except QhullError:  # cannot happen for >= 1 voxel (a cube's corners span 3-D); be safe
        return None
    return float(min(1.0, mask.sum() * np.prod(spacing) / hull_mm3))


def grown_box(lo: np.ndarray, hi: np.ndarray, margin: np.ndarray,
              shape: Sequence[int]) -> tuple[slice, ...]:
    """The box of voxels ``lo - margin .. hi + margin`` (inclusive, per axis) inside ``shape``."""
    start = np.maximum(lo - margin, 0)
    stop = np.minimum(hi + margin + 1, np.asarray(shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))


def shell_margin(spacing: np.ndarray, cfg: DescriptorConfig) -> np.ndarray:
    """(3,) voxels around the lesion's bounding box holding every voxel of the widest shell
    (a voxel within d mm of a lesion voxel is within d / spacing voxels of it on each axis),
    plus one so the lesion never touches a cut face."""
    widest = max(cfg.rim_mm, cfg.vessel_max_mm, cfg.parenchyma_gap_mm, cfg.noise_shell_mm)
    return np.ceil(widest / spacing).astype(int) + 1


def _cut_reach_mm(box: tuple[slice, ...], lo: np.ndarray, hi: np.ndarray,
                  shape: Sequence[int], spacing: np.ndarray) -> float:
    """The least distance (mm) from a voxel of the box ``lo..hi`` to the padding beyond a
    face of ``box`` that cuts the array (faces on the array's border are real borders)."""
    reach = [math.inf]
    for axis, cut in enumerate(box):
        if cut.start > 0:
            reach.append((lo[axis] - cut.start + 1) * spacing[axis])
        if cut.stop < shape[axis]:
            reach.append((cut.stop - hi[axis]) * spacing[axis])
    return float(min(reach))


def lesion_depths_mm(brain: np.ndarray, mask: np.ndarray, centroid: tuple[int, ...],
                     spacing: np.ndarray, margin: np.ndarray) -> tuple[float, float]:
    """(depth of ``centroid``, least depth of a ``mask`` voxel) below the brain surface, in mm,
    as :func:`depth_below_surface_mm` on the whole array gives them, computed on a crop.

    The crop (the lesion's bounding box grown by ``margin`` voxels) treats its cut faces as
    outside the brain, so a depth in it is min(true depth, distance to a cut face): when both
    depths are below the least distance from the lesion's box to a cut face they are exact;
    otherwise the margin doubles (at most up to the whole array).
    """
    idx = np.argwhere(mask)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    while True:
        box = grown_box(lo, hi, margin, brain.shape)
        depth = depth_below_surface_mm(brain[box], spacing)
        origin = np.array([b.start for b in box])
        at_centroid = float(depth[tuple(np.asarray(centroid) - origin)])
        least = float(depth[mask[box]].min())
        if max(at_centroid, least) < _cut_reach_mm(box, lo, hi, brain.shape, spacing):
            return at_centroid, least
        margin = 2 * margin


def _shell(distance_mm: np.ndarray, inner_mm: float, outer_mm: float,
           brain: np.ndarray) -> np.ndarray:
    return (distance_mm > inner_mm) & (distance_mm <= outer_mm) & brain


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def _median_or_none(values: np.ndarray) -> float | None:
    return float(np.median(values)) if values.size else None


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _robust_sd(values: np.ndarray) -> float:
    """1.4826 x the median absolute deviation of non-empty ``values``."""
    return MAD_TO_SD * float(np.median(np.abs(values - np.median(values))))


def _soft(values: np.ndarray, cfg: DescriptorConfig) -> np.ndarray:
    """Whether each density (HU) is soft tissue (not bone, calcification or air)."""
    return (values >= cfg.soft_min_hu) & (values <= cfg.soft_max_hu)


def parenchyma_median_hu(brain: np.ndarray, density_of: Callable[[np.ndarray], np.ndarray],
                         box: tuple[slice, ...], near_lesion: np.ndarray,
                         cfg: DescriptorConfig) -> float | None:
    """The median HU of the soft ``brain`` voxels (whole (D, H, W) volume) outside
    ``near_lesion`` (bool, the shape of ``brain[box]``: the voxels within
    ``parenchyma_gap_mm`` of the lesion, all inside ``box``); ``density_of(index)`` gives
    the HU of the voxels at a boolean index of the whole volume. None if there are none."""
    far = np.asarray(brain, bool).copy()
    far[box] &= ~near_lesion
    values = density_of(far)
    return _median_or_none(values[_soft(values, cfg)])


def noise_hu(density_of_box: Callable[[tuple[slice, ...]], np.ndarray], box: tuple[slice, ...],
             shape: Sequence[int], parenchyma: np.ndarray) -> float | None:
    """1.4826 x the median absolute deviation of ``density - median3(density)`` over the
    ``parenchyma`` voxels (bool, the shape of the ``box`` of a volume of ``shape``).

    ``density_of_box(b)`` gives the HU of box ``b``. The filter runs on ``box`` grown by one
    voxel inside the volume, so each voxel of ``box`` sees the same neighbours as on the whole
    volume (the same float). None without parenchyma.
    """
    grown = grown_box(np.array([b.start for b in box]), np.array([b.stop - 1 for b in box]),
                      np.ones(3, int), shape)
    density = density_of_box(grown)
    inner = tuple(slice(b.start - g.start, b.stop - g.start) for b, g in zip(box, grown,
                                                                              strict=True))
    residual = (density - ndimage.median_filter(density, size=3, mode="reflect"))[inner]
    values = residual[parenchyma]
    return _robust_sd(values) if values.size else None


def core_spread_hu(lesion: np.ndarray, density: np.ndarray, spacing: np.ndarray,
                   cfg: DescriptorConfig) -> float | None:
    """1.4826 x the median absolute deviation (HU) of the soft voxels of ``lesion`` deeper
    than ``core_mm`` below its boundary ((D, H, W) arrays; the array's border counts as
    outside); None with fewer than :data:`MIN_CORE_VOXELS` of them."""
    inside = ndimage.distance_transform_edt(np.pad(lesion, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    core = density[lesion & (inside > cfg.core_mm)]
    core = core[_soft(core, cfg)]
    return _robust_sd(core) if core.size >= MIN_CORE_VOXELS else None


def _density(image: np.ndarray | None, hu: np.ndarray | None,
             window_hu: tuple[float, float]) -> np.ndarray:
    if hu is not None:
        return np.asarray(hu, np.float32)
    return hu_from_window(image, *window_hu)


def lesion_descriptors(mask: np.ndarray, brain: np.ndarray, *, image: np.ndarray | None = None,
                       hu: np.ndarray | None = None, spacing_mm: float | Sequence[float] = 1.0,
                       window_hu: tuple[float, float] = (50.0, 100.0),
                       cfg: DescriptorConfig | None = None,
                       crop: bool = True) -> dict[str, float | None]:
    """The descriptors of :data:`DESCRIPTOR_NAMES` for one lesion (see the module docstring).

    Args:
      mask, brain: (D, H, W) binary arrays; the lesion counts only where it is.
      image: (D, H, W) windowed density in [0, 1], used when ``hu`` is None.
      hu: (D, H, W) density in HU.
      spacing_mm: voxel size, one number or one per axis.
      window_hu: (level, width) of the window that made ``image`` (``data.window_level_hu``,
        ``data.window_width_hu``).
      cfg: the shell and density parameters (defaults: :class:`DescriptorConfig`).
      crop: work on the lesion's bounding box grown by :func:`shell_margin` (the depth on a
        crop that grows until it is exact, :func:`lesion_depths_mm`): the same floats as the
        whole array (``crop=False``), in a fraction of the time.

    Returns:
      name -> float, or None when undefined (empty mask, empty shell).
    """
    cfg = cfg or DescriptorConfig()
    mask, brain = np.asarray(mask).astype(bool), np.asarray(brain).astype(bool)
    if mask.shape != brain.shape:
        raise ValueError(f"mask shape {mask.shape} != brain shape {brain.shape}")
    if hu is None and image is None:
        raise ValueError("lesion_descriptors needs hu or image")
    spacing = _spacing(spacing_mm)
    out: dict[str, float | None] = dict.fromkeys(DESCRIPTOR_NAMES)
    idx = np.argwhere(mask)  # (N, 3)
    out["volume_ml"] = len(idx) * float(np.prod(spacing)) / 1000.0
    if len(idx) == 0:
        return out
    # the rounded centroid from integer sums: the same whatever the crop
    centroid = tuple(np.rint(idx.sum(axis=0) / len(idx)).astype(int))
    full = np.array(mask.shape)
    margin = shell_margin(spacing, cfg) if crop else full
    box = grown_box(idx.min(axis=0), idx.max(axis=0), margin, mask.shape)
    origin = [b.start for b in box]
    def density_at(index) -> np.ndarray:  # HU at a box or boolean index of the whole volume
        return _density(None if image is None else image[index],
                        None if hu is None else hu[index], window_hu)

    density = density_at(box)
    lesion, brain_box = mask[box], brain[box]
    lesion_values = density[lesion]
    to_lesion = ndimage.distance_transform_edt(~lesion, sampling=spacing)
    rim = _shell(to_lesion, 0.0, cfg.rim_mm, brain_box)
    vessel_band = _shell(to_lesion, cfg.vessel_min_mm, cfg.vessel_max_mm, brain_box)
    vessels = density[vessel_band]
    centroid_depth, min_depth = lesion_depths_mm(brain, mask, centroid, spacing, margin)
    brain_median = parenchyma_median_hu(brain, density_at, box,
                                        to_lesion <= cfg.parenchyma_gap_mm, cfg)
    soft = _soft(density, cfg)
    noise = noise_hu(density_at, box, mask.shape,
                     _shell(to_lesion, cfg.parenchyma_gap_mm, cfg.noise_shell_mm, brain_box) & soft)
    core_mad = core_spread_hu(lesion, density, spacing, cfg)
    vessel_shell = density[vessel_band & soft]
    out.update(
        log_volume_ml=math.log(out["volume_ml"]),
        centroid_depth_mm=centroid_depth,
        min_depth_mm=min_depth,
        solidity=solidity(lesion, spacing, origin),
        hu_mean=float(lesion_values.mean()),
        hu_std=float(lesion_values.std()),
        rim_hu_mean=_mean_or_none(density[rim]),
        vessel_fraction=_mean_or_none(
            (vessels >= cfg.vessel_min_hu) & (vessels <= cfg.vessel_max_hu)),
        brain_hu_median=brain_median,
        hu_contrast=_minus(_median_or_none(lesion_values[_soft(lesion_values, cfg)]),
                           brain_median),
        noise_hu=noise,
        core_hu_mad=core_mad,
        core_texture_hu=None if core_mad is None or noise is None
        else math.sqrt(max(core_mad**2 - noise**2, 0.0)),
        rim_contrast=_minus(_median_or_none(density[rim & soft]), brain_median),
        vessel_contrast_fraction=None if brain_median is None else _mean_or_none(
            vessel_shell >= brain_median + cfg.vessel_above_brain_hu),
    )
    return out


def largest_lesion_descriptors(mask: np.ndarray, volume: dict,
                               config: Config) -> dict[str, float | None]:
    """The descriptors of the largest (6-connected) component of a predicted ``mask``
    (D, H, W) on a preprocessed grid: ``volume`` holds its ``brain``, ``image`` and, if at
    hand, ``hu`` (a preprocessed npz's or :func:`mlssp_jax.preprocess.preprocess_volume`'s
    arrays); window, spacing and shells from ``config``. An empty mask: volume 0, the rest None.
    """
    return lesion_descriptors(masks.largest_component(np.asarray(mask, bool)), volume["brain"],
                              image=volume["image"], hu=volume.get("hu"),
                              spacing_mm=config.data.spacing_mm,
                              window_hu=(config.data.window_level_hu,
                                         config.data.window_width_hu),
                              cfg=config.descriptors)


__all__ = ["DESCRIPTOR_NAMES", "MIN_CORE_VOXELS", "core_spread_hu", "depth_below_surface_mm",
           "grown_box", "hu_from_window", "largest_lesion_descriptors", "lesion_depths_mm",
           "lesion_descriptors", "noise_hu", "parenchyma_median_hu", "shell_margin", "solidity"]
