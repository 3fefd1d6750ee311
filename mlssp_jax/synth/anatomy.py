"""The head of one subject: sampled sizes and tissue HU, and its rendering onto a grid.

Layers from the surface inward: scalp, outer table, diploe, inner table, CSF, brain (grey
cortex with sulci over white matter, deep grey nuclei, ventricles larger with age, the
interhemispheric fissure with the falx). The cranial cavity is closed below by the skull
base: a bony floor stepping down from the anterior (orbital roofs) to the middle and the
posterior fossa, with the petrous ridges on it. Below it (:mod:`skull_base`): face and neck
soft tissue, orbits, sinuses and mastoid air, the airway and the cervical spine.
"""

from __future__ import annotations

import numpy as np

from mlssp_jax.synth.geometry import Grid, ellipsoid, soft_step, wave_field, waves
from mlssp_jax.synth.settings import Settings

AIR_HU = -1000.0
MEAN_AXES_MM = np.array([74.0, 93.0, 85.0])  # semi-axes of a mean adult head (x, y, z)
# skull-base floor height (z / z semi-axis) at y / (y semi-axis): anterior fossa (orbital
# roofs), middle fossa, posterior fossa
FLOOR_Y = np.array([-1.0, -0.35, -0.12, 0.3, 0.45, 1.0])
FLOOR_LEVEL = np.array([-0.55, -0.55, -0.42, -0.42, -0.18, -0.18])
FLOOR_RISE = 0.2  # floor height rise (z semi-axes) at the sides (x = x semi-axis)


def _uniform(rng, lo_hi) -> float:
    return float(rng.uniform(*lo_hi))


def _sample_tissue_hu(rng, s: Settings) -> dict:
    """Per-subject HU of every tissue, drawn over the preset's ranges."""
    grey = _uniform(rng, s.grey_hu)
    white = min(_uniform(rng, s.white_hu), grey - s.min_grey_white_hu)
    outer, inner = rng.uniform(*s.cortical_hu, size=2)
    return {
        "white_hu": white, "grey_hu": grey,
        "deep_hu": white + rng.uniform(0.6, 0.9) * (grey - white),
        # scalp, outer table, diploe, inner table, CSF (after each bound)
        "layer_hu": np.array([_uniform(rng, s.scalp_hu), outer, _uniform(rng, s.diploe_hu), inner,
                              _uniform(rng, s.csf_hu)]),
        "muscle_hu": _uniform(rng, s.muscle_hu), "fat_hu": _uniform(rng, s.fat_hu),
        "base_hu": _uniform(rng, s.cortical_hu), "spine_hu": _uniform(rng, s.diploe_hu),
        "headrest_hu": _uniform(rng, s.headrest_hu),
    }


def _sample_headrest(rng) -> dict:
    """Shape and place of the headrest behind the occiput (a flat plate or a curved cradle)."""
    return {"headrest_gap_mm": rng.uniform(1.0, 10.0), "headrest_mm": rng.uniform(3.0, 12.0),
            "headrest_curve": 0.0 if rng.random() < 0.5 else rng.uniform(0.002, 0.006),
            "headrest_shift_mm": rng.normal(0.0, 8.0)}


def sample_anatomy(rng: np.random.Generator, age: float, s: Settings) -> dict:
    """Head size, skull layers (mm), skull base, tissue HU and atrophy of one subject."""
    atrophy = float(np.clip((age - 25.0) / 55.0, 0.0, 1.0))
    scalp, outer, diploe, inner = rng.uniform([3.5, 1.5, 2.0, 1.2], [6.0, 2.5, 4.5, 2.0])
    csf_gap = rng.uniform(0.8, 1.6) + 2.5 * atrophy
    size = _uniform(rng, s.head_scale) * (1 + rng.uniform(-1, 1, 3) * s.head_axis_jitter)
    axes = MEAN_AXES_MM * size
    return {
        "age": age, "atrophy": atrophy, "axes_mm": axes, "size": size,
        # depth (mm from the scalp surface) where each next layer starts
        "bounds_mm": np.cumsum([0.0, scalp, outer, diploe, inner, csf_gap]),
        "floor_mm": FLOOR_LEVEL * axes[2] + rng.normal(0.0, 2.0),  # skull-base floor heights
        "base_mm": rng.uniform(5.0, 10.0),  # skull-base bone thickness below the floor
        "cortex_mm": rng.uniform(2.5, 3.5),
        "gyri": waves(rng, 2, (25.0, 40.0)), "sulci": waves(rng, 3, (18.0, 30.0)),
        "sulcus_halfwidth": 0.05 + 0.08 * atrophy,
        "pineal_calc": rng.random() < age / 110.0, "plexus_calc": rng.random() < age / 90.0,
        **_sample_tissue_hu(rng, s), **_sample_headrest(rng),
    }


def floor_height(x, y, anat: dict):
    """Skull-base floor height ``z`` (mm) at head ``(x, y)`` (mm) and its slopes ``dz/dx``,
    ``dz/dy``: stepping down from front to back, rising towards the sides (a bowl)."""
    a = anat["axes_mm"]
    knots, levels = FLOOR_Y * a[1], anat["floor_mm"]
    slopes = np.diff(levels) / np.diff(knots)
    segment = np.clip(np.searchsorted(knots, y) - 1, 0, len(slopes) - 1)
    rise = np.float32(FLOOR_RISE * a[2] / a[0] ** 2)
    height = np.interp(y, knots, levels).astype(np.float32) + rise * x * x
    return height, np.float32(2.0) * rise * x, slopes[segment].astype(np.float32)


def floor_distance(grid: Grid, anat: dict, box=None):
    """Signed distance (mm) above the skull-base floor and its step width, in ``box``."""
    box = (slice(None),) * 3 if box is None else box
    x, y, z = grid.coords(box)
    height, slope_x, slope_y = floor_height(x, y, anat)
    norm = np.sqrt(1.0 + slope_x * slope_x + slope_y * slope_y)
    return (z - height) / norm, grid.normal_width(-slope_x, -slope_y, 1.0, norm)


def _min_depth(a, wa, b, wb):
    """Depth inside the intersection of two regions (the smaller) and its step width."""
    first = a <= b
    return np.where(first, a, b), np.where(first, wa, wb)


def render_head(grid: Grid, anat: dict):
    """Scalp, skull, skull base and CSF on ``grid``; brain and cavity depths (mm).

    Returns ``(hu, cavity_depth, brain_depth, width)``, each ``(I, J, K)`` float32: HU,
    signed depth inside the inner table/floor (the cranial cavity) and inside the brain
    surface, and the step width (mm) of the nearer boundary.
    """
    whole = (slice(None),) * 3
    depth, width = ellipsoid(grid, whole, (0.0, 0.0, 0.0), anat["axes_mm"])
    floor, floor_w = floor_distance(grid, anat)
    b, layer = anat["bounds_mm"], anat["layer_hu"]
    hu = np.full(grid.shape, AIR_HU, dtype=np.float32)
    hu += (np.float32(layer[0]) - hu) * soft_step(depth, width)
    vault = soft_step(floor + np.float32(anat["base_mm"]), floor_w)
    below = soft_step(depth - np.float32(b[1]), width)
    hu += (np.float32(anat["muscle_hu"]) - hu) * below * (1.0 - vault)
    for bound, value in zip(b[1:4], layer[1:4], strict=True):
        hu += (np.float32(value) - hu) * soft_step(depth - np.float32(bound), width) * vault
    base = below * vault * (1.0 - soft_step(floor, floor_w))
    hu += (np.float32(anat["base_hu"]) - hu) * base
    cavity, cavity_w = _min_depth(depth - np.float32(b[4]), width, floor, floor_w)
    hu += (np.float32(layer[4]) - hu) * soft_step(cavity, cavity_w)
    floor_csf = np.float32(b[5] - b[4])
    brain, brain_w = _min_depth(depth - np.float32(b[5]), width, floor - floor_csf, floor_w)
    return hu, cavity, brain, brain_w


def deep_structures(anat: dict) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """``(centre mm, semi-axes mm, HU)`` of deep grey nuclei then ventricles (head frame)."""
    a, csf, deep = anat["atrophy"], anat["layer_hu"][-1], anat["deep_hu"]
    size = anat["size"]
    bilateral = [((24, 4, 2), (7, 16, 10), deep), ((11, -12, 6), (8, 13, 9), deep),
                 ((13, 14, 12), (5, 9, 8), deep),
                 ((6 + 3 * a, 2, 16), (3 + 2.5 * a, 26, 4.5 + 3 * a), csf),
                 ((15 + 2 * a, -26, 10), (3 + 2 * a, 10, 5 + 2 * a), csf)]
    out = []
    for centre, axes, value in bilateral:
        for side in (-1.0, 1.0):
            out.append((np.array(centre) * [side, 1, 1] * size, np.array(axes) * size, value))
    out.append((np.array([0.0, -6.0, 2.0]) * size, np.array([1 + 1.5 * a, 12, 7]) * size, csf))
    return out


def _render_midline(grid: Grid, anat: dict, hu: np.ndarray) -> None:
    """Interhemispheric fissure (CSF, wider with age) with the falx in it, in place."""
    size = anat["size"]
    s_ip = np.float32(grid.spacing_mm[0])
    half_width = np.float32(0.6 + 1.8 * anat["atrophy"])
    ax = np.abs(grid.x)
    callosum = (grid.y / np.float32(40 * size[1])) ** 2 + ((grid.z - np.float32(10 * size[2]))
                                                          / np.float32(16 * size[2])) ** 2
    fissure = soft_step(half_width - ax, s_ip) * (callosum > 1.0)
    hu += (np.float32(anat["layer_hu"][-1]) - hu) * fissure
    hu += (np.float32(anat["grey_hu"] + 20.0) - hu) * fissure * soft_step(0.3 - ax, s_ip)


def render_brain(grid: Grid, anat: dict, brain_depth: np.ndarray, width: np.ndarray):
    """``(I, J, K)`` HU of the brain: grey/white, sulci, deep nuclei, ventricles, falx."""
    x, y, z = grid.x, grid.y, grid.z
    cortex = np.float32(anat["cortex_mm"]) * (1.0 + 0.4 * wave_field(x, y, z, anat["gyri"]))
    white, grey = np.float32(anat["white_hu"]), np.float32(anat["grey_hu"])
    hu = white + (grey - white) * soft_step(cortex - brain_depth, width)
    lines = np.abs(wave_field(x, y, z, anat["sulci"])) / np.float32(anat["sulcus_halfwidth"])
    sulci = np.clip(1.0 - lines, 0.0, 1.0) * soft_step(np.float32(10.0) - brain_depth, width)
    hu += (np.float32(anat["layer_hu"][-1]) - hu) * sulci
    for centre, axes, value in deep_structures(anat):
        box = grid.box(centre, axes.max() + grid.spacing_mm[2])
        if box is None:
            continue
        depth, w = ellipsoid(grid, box, centre, axes)
        hu[box] += (np.float32(value) - hu[box]) * soft_step(depth, w)
    _render_midline(grid, anat, hu)
    return hu
