"""The hematoma: AVM-related (label 1) vs other intracerebral hemorrhage, sampled and rendered.

The classes differ as the literature describes and overlap. AVM: younger; mostly lobar
(superficial, some against the inner table, some temporal on the middle-fossa floor);
irregular, lobulated margins; heterogeneous density; serpiginous hyperdense vessels and
sometimes calcification beside the clot. Other: older; mostly deep (putamen, thalamus,
caudate); smooth, ellipsoidal, homogeneous; a hypodense edema rim. Volumes follow a
log-normal truncated to the preset's range. No cerebellum or brainstem bleeds.
"""

from __future__ import annotations

import numpy as np

from mlssp_jax.synth.anatomy import floor_height
from mlssp_jax.synth.geometry import Grid, ellipsoid, head_depth, rotation, soft_step, wave_field
from mlssp_jax.synth.geometry import waves as plane_waves
from mlssp_jax.synth.settings import Settings

DEEP_SITES_MM = {"putamen": (24.0, 4.0, 2.0), "thalamus": (11.0, -12.0, 6.0),
                 "caudate": (13.0, 14.0, 12.0)}
SITES = ("lobar", "putamen", "thalamus", "caudate")
SITE_P = {1: (0.8, 0.08, 0.06, 0.06), 0: (0.25, 0.45, 0.22, 0.08)}
TEMPORAL_P = 0.25  # share of lobar hematomas in the temporal lobe, down to the skull base


def _above_floor(point, anat: dict) -> float:
    """Height (mm) of a head-frame point above the skull-base floor."""
    height, _, _ = floor_height(np.float32(point[0]), np.array([point[1]]), anat)
    return float(point[2] - height[0])


def _lobar_direction(rng, temporal: bool) -> np.ndarray:
    """A unit direction to a supratentorial lobe: the convexity, or temporal (low, lateral)."""
    while True:
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        if temporal and -0.45 < u[2] <= -0.05 and abs(u[0]) > 0.6 and -0.3 < u[1] < 0.6:
            return u
        if not temporal and -0.05 < u[2] < 0.8 and abs(u[0]) > 0.25:
            return u


def _lobar_centre(rng, anat: dict, depth_mm: float) -> np.ndarray:
    """A lobar centre ``depth_mm`` below the brain surface and ``depth_mm`` above the floor."""
    axes = anat["axes_mm"]
    target = anat["bounds_mm"][-1] + depth_mm
    temporal = rng.random() < TEMPORAL_P
    for _ in range(100):
        u = _lobar_direction(rng, temporal)
        lam = 1.0 / np.linalg.norm(u / axes)
        normal = lam * u / axes**2
        cos = float(u @ normal / np.linalg.norm(normal))
        for _ in range(4):
            lam -= (target - head_depth(lam * u, axes)) / cos
        if _above_floor(lam * u, anat) > depth_mm:
            return lam * u
    raise RuntimeError("no lobar site found")  # a generator bug


def _sample_site(rng, label: int, anat: dict, radius_mm: float):
    """``(site name, centre (3,) head mm)`` of the hematoma."""
    site = str(rng.choice(SITES, p=SITE_P[label]))
    if site == "lobar":
        depth = rng.uniform(0.3, 0.9) * radius_mm + rng.uniform(0.0, 6.0)
        return site, _lobar_centre(rng, anat, depth)
    side = rng.choice([-1.0, 1.0])
    base = np.array(DEEP_SITES_MM[site]) * np.array([side, 1.0, 1.0])
    return site, base * anat["size"] + rng.normal(0.0, 2.0, 3)


def _sample_volume(rng, avm: bool, s: Settings) -> float:
    """Hematoma volume (mL): log-normal around the class's median, truncated to the range."""
    lo, hi = s.volume_ml
    median = s.volume_median_ml[0 if avm else 1]
    while True:
        volume = float(rng.lognormal(np.log(median), s.volume_sigma))
        if lo <= volume <= hi:
            return volume


def _sample_density(rng, avm: bool, s: Settings) -> dict:
    """Clot HU (AVM: lower, heterogeneous), edema rim and vessel HU."""
    lo, hi = s.blood_hu
    span = hi - lo
    return {
        "hu": rng.uniform(lo, lo + 0.7 * span) if avm else rng.uniform(lo + 0.25 * span, hi),
        "texture_hu": rng.uniform(4.0, 26.0) if avm else rng.uniform(2.0, 9.0),
        "texture": plane_waves(rng, 3, (6.0, 16.0)),
        "edema_mm": rng.uniform(1.0, 4.0 if avm else 7.0) if rng.random() < (0.4 if avm else 0.9)
        else 0.0,
        "edema_hu": rng.uniform(*s.edema_hu),
        "vessel_hu": rng.uniform(lo, lo + 0.45 * span),
    }


def sample_lesion(rng, label: int, anat: dict, s: Settings) -> dict:
    """Hematoma size, shape, site, density and the AVM signs (vessels, calcification)."""
    avm = label == 1
    volume = _sample_volume(rng, avm, s)
    radius = (3.0 * volume * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
    aspect = np.exp(rng.normal(0.0, 0.15, 3))
    amplitude = rng.uniform(0.08, 0.35) if avm else rng.uniform(0.02, 0.14)
    axes = radius * aspect / np.prod(aspect) ** (1.0 / 3.0)
    site, centre = _sample_site(rng, label, anat, radius)
    n_lobes = 4
    dirs = rng.normal(size=(n_lobes, 3))
    lesion = {
        "site": site, "centre": centre, "axes": axes, "rot": rotation(rng),
        "lobes": (dirs / np.linalg.norm(dirs, axis=1, keepdims=True),
                  rng.uniform(2.0, 5.0, n_lobes), rng.uniform(0, 2 * np.pi, n_lobes), amplitude),
        "irregularity": amplitude, "nominal_ml": volume, **_sample_density(rng, avm, s),
        "n_vessels": int(rng.choice(6, p=[0.15, 0.1, 0.25, 0.25, 0.15, 0.1])) if avm
        else int(rng.random() < 0.05),
        "n_calcs": int(rng.integers(1, 4)) if rng.random() < (0.35 if avm else 0.05) else 0,
    }
    _sample_avm_signs(rng, lesion, anat)
    return lesion


def _vessel_path(rng, lesion: dict, anat: dict) -> tuple[np.ndarray, float]:
    """A serpiginous vessel: ``(points (n, 3) head mm, radius mm)`` starting at the clot."""
    u = rng.normal(size=3)
    u /= np.linalg.norm(u)
    outward = lesion["rot"] @ u
    point = lesion["centre"] + lesion["rot"] @ (lesion["axes"] * u) * 1.1
    direction = rng.normal(size=3)
    direction -= (direction @ outward) * outward
    direction = direction / np.linalg.norm(direction) + 0.4 * outward
    n_steps = int(rng.integers(12, 40))
    radius = float(rng.uniform(0.9, 2.0))
    min_depth = anat["bounds_mm"][-1] + 1.5
    points = []
    for _ in range(n_steps):
        if (head_depth(point, anat["axes_mm"]) < min_depth + radius
                or _above_floor(point, anat) < 2.0 + radius):
            break
        points.append(point.copy())
        direction = direction / np.linalg.norm(direction) + rng.normal(0.0, 0.45, 3)
        point = point + direction / np.linalg.norm(direction)
    return np.array(points).reshape(-1, 3), radius


def _sample_avm_signs(rng, lesion: dict, anat: dict) -> None:
    """Add ``vessels`` (paths) and ``calcs`` (points, radii, HU) beside the clot to ``lesion``."""
    lesion["vessels"] = [_vessel_path(rng, lesion, anat) for _ in range(lesion["n_vessels"])]
    calcs = []
    for _ in range(lesion["n_calcs"]):
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        point = lesion["centre"] + lesion["rot"] @ (lesion["axes"] * u) * 1.15
        calcs.append((point, float(rng.uniform(0.8, 2.0)), float(rng.uniform(200.0, 600.0))))
    lesion["calcs"] = calcs


def render_lesion(grid: Grid, lesion: dict, hu: np.ndarray, cavity_depth: np.ndarray,
                  width: np.ndarray) -> np.ndarray:
    """Blend the hematoma and its edema rim into ``hu`` in place; return its fraction.

    Blood stays inside the cranial cavity (``cavity_depth`` > 0: up to the inner table and
    the floor). Returns ``(I, J, K)`` float32 blood fraction (the mask is fraction >= 0.5).
    """
    axes, amplitude = lesion["axes"], lesion["lobes"][3]
    reach = axes.max() * (1.0 + amplitude) + lesion["edema_mm"] + grid.spacing_mm[2]
    box = grid.box(lesion["centre"], reach)
    blood = np.zeros(grid.shape, dtype=np.float32)
    if box is None:
        return blood
    depth, w = ellipsoid(grid, box, lesion["centre"], axes, lesion["rot"], lesion["lobes"])
    inside = soft_step(cavity_depth[box] - np.float32(0.3), width[box])
    frac = soft_step(depth, w) * inside
    if lesion["edema_mm"] > 0:
        rim = soft_step(depth + np.float32(lesion["edema_mm"]), w) * (1.0 - frac) * inside
        hu[box] += (np.float32(lesion["edema_hu"]) - hu[box]) * rim
    clot = np.float32(lesion["hu"]) + np.float32(lesion["texture_hu"]) * wave_field(
        *grid.coords(box), lesion["texture"])
    hu[box] += (clot - hu[box]) * frac
    blood[box] = frac
    return blood


def blobs(anat: dict, lesion: dict) -> list[tuple[np.ndarray, float, float]]:
    """``(centre mm, radius mm, HU)`` of the small bright spheres: AVM vessels (as chains),
    calcifications beside the clot, and age-related pineal/choroid plexus calcification."""
    out = [(point, radius, lesion["vessel_hu"])
           for points, radius in lesion["vessels"] for point in points]
    out += lesion["calcs"]
    size = anat["size"]
    if anat["pineal_calc"]:
        out.append((np.array([0.0, -22.0, 4.0]) * size, 2.5, 350.0))
    if anat["plexus_calc"]:
        out += [(np.array([s * 15.0, -26.0, 10.0]) * size, 2.5, 250.0) for s in (-1, 1)]
    return out


def render_blob(grid: Grid, hu: np.ndarray, centre, radius_mm: float, value_hu: float,
                keep_out: np.ndarray | None = None) -> None:
    """Blend a sphere of ``value_hu`` into ``hu`` in place (not where ``keep_out`` is 1)."""
    box = grid.box(centre, radius_mm + grid.spacing_mm[2])
    if box is None:
        return
    depth, width = ellipsoid(grid, box, centre, (radius_mm,) * 3)
    frac = soft_step(depth, width)
    if keep_out is not None:
        frac *= 1.0 - keep_out[box]
    hu[box] += (np.float32(value_hu) - hu[box]) * frac

