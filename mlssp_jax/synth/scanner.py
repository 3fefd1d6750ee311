"""The scanner: grid (spacing, slices, coverage, voxel order, gantry tilt, head pose), storage,
and rendering one subject (phantom, in-plane blur, noise, quantisation, ground-truth facts).

The phantom is drawn on an in-plane grid about ``Settings.render_mm`` apart, interpolated
linearly onto the scanner grid, blurred in-plane (the scanner's point spread), then noise is
added and HU rounded and clipped at -1024 as a CT scanner outputs them. Every subject's
randomness comes from ``numpy.random.default_rng([seed, index])``, so output is byte-identical
across runs.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from mlssp_jax.synth.anatomy import render_brain, render_head, sample_anatomy
from mlssp_jax.synth.geometry import Grid, head_depth, rotation, soft_step, upsample_inplane
from mlssp_jax.synth.lesions import blobs, render_blob, render_lesion, sample_lesion
from mlssp_jax.synth.settings import Settings
from mlssp_jax.synth.skull_base import render_face_and_neck, render_headrest, render_petrous

SLAB_VOXELS = 400_000  # voxels rendered at a time (keeps temporaries in cache)
# voxel-axis signs (before the gantry tilt): RAS, LPS, LPI, RPS, LAS
FLIPS = ([1, 1, 1], [-1, -1, 1], [-1, -1, -1], [1, -1, 1], [-1, 1, 1])
FLIP_P = (0.3, 0.35, 0.1, 0.1, 0.15)
# stored as int16 with (scl_slope, scl_inter), or without scaling (None: HU stored directly)
STORAGE = {"dicom": (1.0, -1024.0), "scaled": (1.0, 0.0), "raw": (None, None)}


def _coverage(rng, anat: dict, lesion: dict) -> tuple[float, float, str]:
    """Head-frame z range ``(lo, hi)`` (mm) the scan covers, and its name ("neck-vertex"...).

    Bottom: the neck, the skull base, or above it; top: above the vertex or cut below it.
    Always holds the whole lesion with 5 mm to spare.
    """
    a, floor = anat["axes_mm"], anat["floor_mm"]
    base = floor[0] - anat["base_mm"]
    bottom = str(rng.choice(["neck", "base", "high"], p=[0.4, 0.45, 0.15]))
    z_lo = {"neck": base - rng.uniform(20.0, 70.0), "base": base - rng.uniform(0.0, 15.0),
            "high": floor[2] + rng.uniform(-5.0, 15.0)}[bottom]
    top = "vertex" if rng.random() < 0.75 else "cut"
    z_hi = a[2] + rng.uniform(2.0, 12.0) if top == "vertex" else a[2] - rng.uniform(3.0, 20.0)
    reach = lesion["axes"].max() * (1.0 + lesion["lobes"][3]) + lesion["edema_mm"] + 5.0
    z_lo = min(z_lo, lesion["centre"][2] - reach)
    z_hi = max(z_hi, lesion["centre"][2] + reach)
    return z_lo, z_hi, f"{bottom}-{top}"


def _affine(lin, shape, fov_centre) -> np.ndarray:
    """Voxel -> world affine with linear part ``lin`` whose grid centre is ``fov_centre``."""
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = fov_centre - lin @ ((np.array(shape) - 1) / 2.0)
    return affine


def sample_scanner(rng, anat: dict, lesion: dict, s: Settings) -> tuple[Grid, dict]:
    """The scanner grid and storage of one subject: ``(grid, scanner facts)``."""
    s_ip = round(float(rng.uniform(*s.spacing_mm)), 4)
    s_k = float(rng.choice(s.slice_mm))
    flips = np.array(FLIPS[rng.choice(len(FLIPS), p=FLIP_P)])
    tilt = float(rng.uniform(-20.0, 20.0)) if rng.random() < 0.35 else 0.0
    t = np.deg2rad(tilt)
    gantry = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    lin = gantry @ np.diag(flips * [s_ip, s_ip, s_k])
    pose = rotation(rng, max_deg=6.0)
    head_centre = rng.normal(0.0, 5.0, 3) + [0.0, 20.0, 0.0]
    axes = anat["axes_mm"]
    back = axes[1] + anat["headrest_gap_mm"] + anat["headrest_mm"] + 4.0
    z_lo, z_hi, coverage = _coverage(rng, anat, lesion)
    extent = np.array([2 * axes[0] * 1.15 + 20, (axes[1] + back) * 1.12 + 20])
    shape = (*np.ceil(extent / s_ip).astype(int), int(np.ceil((z_hi - z_lo) / s_k)) + 1)
    fov_centre = head_centre + pose @ [0.0, (axes[1] - back) / 2, (z_lo + z_hi) / 2]
    head_from_world = np.eye(4)
    head_from_world[:3, :3] = pose.T
    head_from_world[:3, 3] = -pose.T @ head_centre
    storage = str(rng.choice(list(STORAGE)))
    facts = {"spacing_mm": s_ip, "slice_mm": s_k, "n_slices": shape[2], "tilt_deg": round(tilt, 2),
             "coverage": coverage, "coverage_mm": round(float(z_hi - z_lo), 1),
             "noise_hu": round(float(rng.uniform(*s.noise_hu)), 2),
             "blur_mm": round(float(rng.uniform(*s.blur_mm)), 3), "storage": storage,
             "render_step": max(1, round(s.render_mm / s_ip))}
    return Grid(shape, _affine(lin, shape, fov_centre), head_from_world), facts


def sample_subject(index: int, label: int, seed: int, s: Settings):
    """All random choices of one subject: ``(anatomy, lesion, grid, scanner facts, rng)``.

    The generator is ``default_rng([seed, index])``; the returned rng continues it (noise).
    """
    rng = np.random.default_rng([seed, index])
    if label == 1:
        age = float(np.clip(rng.normal(35.0, 13.0), 12.0, 75.0))
    else:
        age = float(np.clip(rng.normal(62.0, 11.0), 30.0, 90.0))
    anat = sample_anatomy(rng, age, s)
    lesion = sample_lesion(rng, label, anat, s)
    grid, scanner = sample_scanner(rng, anat, lesion, s)
    return anat, lesion, grid, scanner, rng


def _render_slab(grid: Grid, anat: dict, lesion: dict):
    """Noise-free, unblurred scan of (a slab of) the grid: ``(hu, blood fraction)``."""
    hu, cavity, brain_depth, width = render_head(grid, anat)
    render_face_and_neck(grid, anat, hu)
    brain = render_brain(grid, anat, brain_depth, width)
    hu += soft_step(brain_depth, width) * (brain - hu)
    blood = render_lesion(grid, lesion, hu, cavity, width)
    blood *= 1.0 - render_petrous(grid, anat, hu)
    render_headrest(grid, anat, hu)
    return hu, blood


def render_phantom(grid: Grid, anat: dict, lesion: dict):
    """The noise-free scan on ``grid``, a few slices at a time: ``(hu, blood fraction)``."""
    hu = np.empty(grid.shape, dtype=np.float32)
    blood = np.empty(grid.shape, dtype=np.float32)
    step = max(1, SLAB_VOXELS // (grid.shape[0] * grid.shape[1]))
    for k0 in range(0, grid.shape[2], step):
        k1 = min(k0 + step, grid.shape[2])
        hu[..., k0:k1], blood[..., k0:k1] = _render_slab(grid.slab(k0, k1), anat, lesion)
    for centre, radius, value in blobs(anat, lesion):
        render_blob(grid, hu, centre, radius, value, keep_out=blood)
    return hu, blood


def render_subject(index: int, label: int, seed: int, s: Settings):
    """One subject's scan: ``(hu (I, J, K) float32, mask (I, J, K) uint8, grid, facts)``.

    ``hu`` is whole HU clipped at -1024; ``facts`` are the subject's ground truth (a row of
    ``subjects.csv`` without id and label).
    """
    anat, lesion, grid, scanner, rng = sample_subject(index, label, seed, s)
    step = scanner.pop("render_step")
    hu, blood = render_phantom(grid.coarse(step), anat, lesion)
    if step > 1:
        hu, blood = (upsample_inplane(a, step, grid.shape) for a in (hu, blood))
    sigma = scanner["blur_mm"] / grid.spacing_mm[0]
    hu = ndimage.gaussian_filter(hu, sigma=(sigma, sigma, 0.0), mode="nearest")
    noise = rng.standard_normal(grid.shape, dtype=np.float32)
    noise *= np.float32(scanner["noise_hu"])
    hu += noise
    np.maximum(np.rint(hu, out=hu), np.float32(-1024.0), out=hu)
    mask = (blood >= 0.5).astype(np.uint8)
    facts = _lesion_facts(grid, mask, hu, anat)
    facts.update(preset=s.name, age=round(anat["age"], 1), site=lesion["site"],
                 nominal_ml=round(lesion["nominal_ml"], 2),
                 irregularity=round(lesion["irregularity"], 3),
                 edema_mm=round(lesion["edema_mm"], 2), n_vessels=len(lesion["vessels"]),
                 calcified=int(bool(lesion["calcs"])),
                 head_mm="x".join(f"{2 * a:.0f}" for a in anat["axes_mm"]),
                 grey_hu=round(anat["grey_hu"], 1), white_hu=round(anat["white_hu"], 1),
                 blood_hu=round(lesion["hu"], 1), **scanner)
    return hu, mask, grid, facts


def _lesion_facts(grid: Grid, mask: np.ndarray, hu: np.ndarray, anat: dict) -> dict:
    """Volume (mL), extent (mm), centroid depth below the brain surface (mm), HU stats."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        raise RuntimeError("synthetic lesion fell outside the brain")  # a generator bug
    lin = grid.affine[:3, :3]
    world = idx @ lin.T
    extent = world.max(axis=0) - world.min(axis=0) + np.abs(lin).sum(axis=1)
    centroid_head = grid.head_from_voxel @ np.append(idx.mean(axis=0), 1.0)
    depth = head_depth(centroid_head, anat["axes_mm"]) - anat["bounds_mm"][-1]
    values = hu[mask.astype(bool)]
    return {"volume_ml": round(float(len(idx) * abs(np.linalg.det(lin))) / 1000.0, 3),
            "extent_mm": round(float(extent.max()), 2), "depth_mm": round(float(depth), 2),
            "mean_hu": round(float(values.mean()), 2), "std_hu": round(float(values.std()), 2)}
