"""Below and behind the brain: petrous ridges, orbits, sinuses, mastoids, airway, spine, neck,
and the headrest (all in head mm, scaled with the subject's head)."""

from __future__ import annotations

import numpy as np

from mlssp_jax.synth.anatomy import AIR_HU, FLOOR_RISE
from mlssp_jax.synth.geometry import Grid, cylinder, ellipsoid, soft_step

PETROUS_DEG = 40.0  # petrous ridges run obliquely, from lateral-posterior to medial-anterior


def paint(grid: Grid, hu: np.ndarray, centre, axes, value_hu: float, rot=None,
          z_top: float | None = None) -> tuple | None:
    """Blend an ellipsoid (or, with ``z_top``, a vertical cylinder below ``z_top`` mm) of
    ``value_hu`` into ``hu`` in place. Returns ``(box, fraction)`` or None if off the grid."""
    centre = np.asarray(centre, dtype=float)
    if z_top is None:
        box = grid.box(centre, float(np.max(axes)) + grid.spacing_mm[2])
        if box is None:
            return None
        depth, width = ellipsoid(grid, box, centre, axes, rot)
        frac = soft_step(depth, width)
    else:
        box = (slice(None),) * 3
        depth, width = cylinder(grid, box, centre[:2], axes[:2])
        frac = soft_step(depth, width) * soft_step(np.float32(z_top) - grid.z,
                                                   np.float32(grid.spacing_mm[2]))
    hu[box] += (np.float32(value_hu) - hu[box]) * frac
    return box, frac


def _face(anat: dict) -> list[tuple]:
    """``(centre, semi-axes, HU)`` painted in order: bony shells first, their contents after."""
    a, (f_mid, f_ant) = anat["axes_mm"], anat["floor_mm"][[2, 4]]
    base, bone, fat, csf = anat["base_mm"], anat["base_hu"], anat["fat_hu"], anat["layer_hu"][4]
    r_orbit = 0.2 * a[0]
    parts = []
    for side in (-1.0, 1.0):
        orbit = np.array([side * 0.42 * a[0], 0.62 * a[1], f_ant - base - r_orbit + 3.0])
        sinus = np.array([side * 0.3 * a[0], 0.45 * a[1], f_ant - base - 2.2 * r_orbit])
        mastoid = np.array([side * 0.72 * a[0], -0.2 * a[1], f_mid - base - 7.0])
        parts += [(orbit, [r_orbit + 2.0] * 3, bone), (orbit, [r_orbit] * 3, fat),
                  (orbit + [0, 0.3 * r_orbit, 0], [0.75 * r_orbit] * 3, csf),
                  (sinus, [0.18 * a[0] + 2.0, 0.16 * a[1] + 2.0, 0.16 * a[2] + 2.0], bone),
                  (sinus, [0.18 * a[0], 0.16 * a[1], 0.16 * a[2]], AIR_HU),
                  (mastoid, [10.0] * 3, bone), (mastoid, [6.0] * 3, AIR_HU)]
    sphenoid = np.array([0.0, 0.18 * a[1], f_mid - base - 8.0])
    nasal = np.array([0.0, 0.55 * a[1], f_ant - base - 1.6 * r_orbit])
    parts += [(sphenoid, [16.0, 14.0, 10.0], bone), (sphenoid, [11.0, 9.0, 7.0], AIR_HU),
              (nasal, [5.0, 0.2 * a[1], 0.17 * a[2]], AIR_HU)]
    return parts


def render_face_and_neck(grid: Grid, anat: dict, hu: np.ndarray) -> None:
    """Neck soft tissue, the face's orbits and sinuses, mastoid air, airway and spine, in place."""
    a, floor = anat["axes_mm"], anat["floor_mm"]
    below_base = floor[0] - anat["base_mm"]
    neck = (0.0, -0.1 * a[1], 0.0)
    paint(grid, hu, neck, (0.62 * a[0], 0.55 * a[1]), anat["layer_hu"][0], z_top=-0.7 * a[2])
    paint(grid, hu, neck, (0.62 * a[0] - 4.0, 0.55 * a[1] - 4.0), anat["muscle_hu"],
          z_top=-0.7 * a[2])
    for centre, axes, value in _face(anat):
        paint(grid, hu, centre, axes, value)
    paint(grid, hu, (0.0, 0.08 * a[1], 0.0), (8.0, 6.0), AIR_HU, z_top=floor[2] - 30.0)
    paint(grid, hu, (0.0, -0.22 * a[1], 0.0), (10.0, 9.0), anat["spine_hu"],
          z_top=below_base - 8.0)


def render_petrous(grid: Grid, anat: dict, hu: np.ndarray) -> np.ndarray:
    """The petrous ridges on the floor between middle and posterior fossa, in place.

    Drawn over the brain; returns their ``(I, J, K)`` bone fraction (kept out of the lesion).
    """
    a, f_mid = anat["axes_mm"], anat["floor_mm"][2]
    bone = np.zeros(grid.shape, dtype=np.float32)
    for side in (-1.0, 1.0):
        t = np.deg2rad(side * PETROUS_DEG)
        rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
        centre = (side * 0.5 * a[0], -0.2 * a[1], f_mid - 3.0 + FLOOR_RISE * 0.25 * a[2])
        painted = paint(grid, hu, centre, (0.3 * a[0], 6.0, 5.0), anat["base_hu"], rot=rot)
        if painted is not None:
            box, frac = painted
            bone[box] = np.maximum(bone[box], frac)
    return bone


def render_headrest(grid: Grid, anat: dict, hu: np.ndarray) -> None:
    """The headrest behind the occiput (flat plate or curved cradle), in air only, in place."""
    axes, s_ip = anat["axes_mm"], np.float32(grid.spacing_mm[0])
    x = grid.x - np.float32(anat["headrest_shift_mm"])
    front = np.float32(-(axes[1] + anat["headrest_gap_mm"])) + np.float32(
        anat["headrest_curve"]) * x * x
    thick = np.float32(anat["headrest_mm"])
    plate = (soft_step(front - grid.y, s_ip) * soft_step(grid.y - (front - thick), s_ip)
             * soft_step(np.float32(0.85 * axes[0]) - np.abs(x), s_ip))
    plate *= hu < np.float32(AIR_HU + 100.0)
    hu += (np.float32(anat["headrest_hu"]) - hu) * plate
