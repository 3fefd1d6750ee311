"""Synthetic head-CT cohort: AVM-related vs other intracerebral hemorrhage, in HU.

Each subject is an analytic phantom rendered straight onto its scanner grid (in-plane
0.40-0.50 mm, 4.5 or 5 mm slices, ~26 slices; ``--small``: a half-size head at ~1.5 mm x
3 mm): scalp, a skull of two cortical tables around diploe, CSF, grey and white matter
with sulci, deep grey nuclei, ventricles (larger with age), the falx, and a hematoma.
Partial volume is analytic (each boundary's step is spread over the voxel's extent along
the boundary normal, so 5 mm slices blur top and bottom). The in-plane scanner blur comes
from drawing the phantom on a grid twice as coarse in-plane and interpolating it linearly
(``--small``: a Gaussian blur); then 4-6 HU noise. Scans are stored like converted DICOM:
int16 with scl_slope/scl_inter, in RAS- or LPS-like voxel order, some with an oblique
(gantry-tilt) affine.

The classes differ as the literature describes and overlap:
AVM (label 1): younger; mostly lobar/superficial; irregular, lobulated margins;
heterogeneous density; serpiginous hyperdense vessels and sometimes calcification beside
the clot. Other (label 0): older; mostly deep (putamen, thalamus, caudate); smooth,
ellipsoidal, homogeneous; a hypodense edema rim. No cerebellum or brainstem bleeds.

Head coordinates (mm): x left->right, y posterior->anterior, z inferior->superior, origin
at the centre of the head ellipsoid. Every subject's randomness comes from
``numpy.random.default_rng([seed, index])``, so files are byte-identical across runs.
"""

from __future__ import annotations

import concurrent.futures
import csv
import fcntl
import functools
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from mlssp_jax import cache, nifti
from mlssp_jax.cli import ArgumentParser, run_command, setup_logging
from mlssp_jax.errors import InputError
from mlssp_jax.fileio import atomic_dir

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the phantom changes: it keys the default-cohort cache
MANIFEST_NAME = "manifest.csv"
FACTS_NAME = "subjects.csv"
FACT_FIELDS = ("subject_id", "label", "age", "site", "volume_ml", "depth_mm", "mean_hu",
               "std_hu", "extent_mm", "irregularity", "edema_mm", "n_vessels", "calcified",
               "spacing_mm", "slice_mm", "n_slices", "orientation", "tilt_deg")
AIR_HU = -1000.0
HEADREST_MM = 5.0
SLAB_VOXELS = 400_000  # voxels rendered at a time (keeps temporaries in cache)
DEEP_SITES_MM = {"putamen": (24.0, 4.0, 2.0), "thalamus": (11.0, -12.0, 6.0),
                 "caudate": (13.0, 14.0, 12.0)}


@dataclass(frozen=True)
class Mode:
    """Scanner geometry and lesion sizes of a cohort (full size or ``--small``)."""

    scale: float            # anatomy size relative to an adult head
    spacing_mm: tuple       # in-plane spacing range (lo, hi)
    slice_mm: tuple         # slice thicknesses to choose from
    volume_ml: tuple        # hematoma volume (lo, hi) in mL
    max_axis_mm: float      # largest lesion semi-axis incl. lobulation (mm), 0 = no cap
    blur_mm: float          # in-plane scanner blur (Gaussian sigma, mm), 0 = none
    phantom_step: int       # phantom drawn on an in-plane grid this much coarser, then
    #                         linearly interpolated (the scanner's in-plane blur)


FULL = Mode(1.0, (0.40, 0.50), (4.5, 5.0), (2.5, 60.0), 0.0, 0.0, 2)
SMALL = Mode(0.5, (1.4, 1.6), (3.0,), (1.2, 3.0), 11.0, 0.6, 1)


def soft_step(dist_mm: np.ndarray, width_mm: np.ndarray | float) -> np.ndarray:
    """Partial-volume fraction inside a boundary: ``clip(0.5 + dist / width, 0, 1)``.

    ``dist_mm`` is the signed distance inside (positive) the boundary, ``width_mm`` the
    voxel's extent along the boundary normal.
    """
    return np.clip(np.float32(0.5) + dist_mm / width_mm, 0.0, 1.0)


def _rotation(rng: np.random.Generator, max_deg: float | None = None) -> np.ndarray:
    """A random 3x3 rotation: uniform if ``max_deg`` is None, else small about each axis."""
    if max_deg is None:
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        return q if np.linalg.det(q) > 0 else -q
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


class Grid:
    """The scanner grid of one subject (or a slab of its slices) and voxel head coordinates.

    ``x, y, z``: ``(I, J, K)`` float32 head coordinates (mm) of the voxel centres (computed
    on first use);
    ``affine``: voxel -> world mm; ``head_from_voxel``: ``(3, 4)`` voxel -> head mm.
    """

    def __init__(self, shape, affine, head_from_world):
        self.shape = tuple(int(n) for n in shape)
        self.affine = affine
        self.head_from_world = head_from_world
        self.head_from_voxel = (head_from_world @ affine)[:3]
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        self.spacing_mm = spacing
        self.slice_dir = self.head_from_voxel[:, 2] / spacing[2]  # unit vector, head frame
        self._voxel_from_head = np.linalg.inv(self.head_from_voxel[:, :3])

    @functools.cached_property
    def _xyz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m = self.head_from_voxel.astype(np.float32)
        idx = [np.arange(n, dtype=np.float32) for n in self.shape]
        i, j, k = idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :]
        return tuple(m[a, 0] * i + m[a, 1] * j + m[a, 2] * k + m[a, 3] for a in range(3))

    x = property(lambda self: self._xyz[0])
    y = property(lambda self: self._xyz[1])
    z = property(lambda self: self._xyz[2])

    def coarse(self, factor: int) -> Grid:
        """The grid ``factor`` times coarser in-plane (voxel c centred on fine f*c + (f-1)/2)."""
        if factor == 1:
            return self
        scale = np.diag([factor, factor, 1.0, 1.0])
        scale[:2, 3] = (factor - 1) / 2.0
        shape = (-(-self.shape[0] // factor), -(-self.shape[1] // factor), self.shape[2])
        return Grid(shape, self.affine @ scale, self.head_from_world)

    def slab(self, k0: int, k1: int) -> Grid:
        """The sub-grid of slices ``k0:k1``."""
        shift = np.eye(4)
        shift[2, 3] = k0
        return Grid((*self.shape[:2], k1 - k0), self.affine @ shift, self.head_from_world)

    def box(self, centre_mm, radius_mm: float) -> tuple[slice, slice, slice] | None:
        """Voxel slices covering the head-frame cube ``centre +- radius``; None if outside."""
        centre = self._voxel_from_head @ (np.asarray(centre_mm) - self.head_from_voxel[:, 3])
        half = np.abs(self._voxel_from_head).sum(axis=1) * radius_mm
        lo = np.clip(np.floor(centre - half), 0, self.shape).astype(int)
        hi = np.clip(np.ceil(centre + half) + 1, 0, self.shape).astype(int)
        if (hi <= lo).any():
            return None
        return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))

    def coords(self, box):
        """Head coordinates ``(x, y, z)`` (mm) of the voxels in ``box``."""
        return self.x[box], self.y[box], self.z[box]

    def normal_width(self, gx, gy, gz, gnorm) -> np.ndarray:
        """Voxel extent (mm) along the normal ``g / |g|``: the partial-volume step width."""
        s_ip, s_k = np.float32(self.spacing_mm[0]), np.float32(self.spacing_mm[2])
        e = self.slice_dir.astype(np.float32)
        cos_k = (gx * e[0] + gy * e[1] + gz * e[2]) / gnorm
        return np.sqrt(s_ip * s_ip + (s_k * s_k - s_ip * s_ip) * cos_k * cos_k)


def ellipsoid(grid: Grid, box, centre, axes, rot=None, lobes=None):
    """Signed depth inside an ellipsoid (mm, first-order) and the step width, in ``box``.

    Args:
      centre: ``(3,)`` head mm; axes: ``(3,)`` semi-axes (mm); rot: ``(3, 3)`` local->head.
      lobes: optional ``(dirs (L, 3), freqs (L,), phases (L,), amplitude)``: the surface
        radius becomes ``1 + amplitude * mean_l cos(freq_l * u.dir_l + phase_l)`` (u = unit
        direction), giving lobulated, concave margins.
    Returns:
      ``(depth_mm, width_mm)``, each of the box's shape.
    """
    x, y, z = grid.coords(box)
    rot = np.eye(3) if rot is None else rot
    p = [x - np.float32(centre[0]), y - np.float32(centre[1]), z - np.float32(centre[2])]
    q = [sum(np.float32(rot[r, a]) * p[r] for r in range(3)) / np.float32(axes[a])
         for a in range(3)]
    radius = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2]) + np.float32(1e-6)
    surface = np.float32(1.0)
    if lobes is not None:
        dirs, freqs, phases, amplitude = lobes
        wave = sum(np.cos(np.float32(f) * (q[0] * np.float32(d[0]) + q[1] * np.float32(d[1])
                                           + q[2] * np.float32(d[2])) / radius + np.float32(ph))
                   for d, f, ph in zip(dirs, freqs, phases, strict=True))
        surface = 1.0 + np.float32(amplitude / len(freqs)) * wave
    g_local = [q[a] / np.float32(axes[a]) for a in range(3)]
    g = [sum(np.float32(rot[r, a]) * g_local[a] for a in range(3)) for r in range(3)]
    gnorm = np.sqrt(g[0] * g[0] + g[1] * g[1] + g[2] * g[2]) + np.float32(1e-9)
    depth = (surface - radius) * radius / gnorm
    return depth, grid.normal_width(g[0], g[1], g[2], gnorm)


def _waves(rng, n: int, wavelength_mm: tuple) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random plane waves: wave vectors ``(n, 3)`` (rad/mm) and phases ``(n,)``."""
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = 2 * np.pi / rng.uniform(*wavelength_mm, size=n)
    return (dirs * k[:, None]).astype(np.float32), rng.uniform(0, 2 * np.pi, n).astype(np.float32)


def wave_field(x, y, z, waves) -> np.ndarray:
    """Mean of plane waves ``cos(k . p + phase)`` at head coordinates: values in [-1, 1]."""
    ks, phases = waves
    return sum(np.cos(k[0] * x + k[1] * y + k[2] * z + ph) for k, ph in zip(ks, phases,
                                                                           strict=True)) / len(ks)


# --------------------------------------------------------------------------- sampling
_MEAN_AXES_MM = np.array([74.0, 93.0, 85.0])


def _sample_anatomy(rng: np.random.Generator, age: float, mode: Mode) -> dict:
    """Head size, skull layers (mm), tissue HU and atrophy of one subject."""
    atrophy = float(np.clip((age - 25.0) / 55.0, 0.0, 1.0))
    scalp, outer, diploe, inner = rng.uniform([3.5, 1.5, 2.0, 1.2], [6.0, 2.5, 4.5, 2.0])
    csf_gap = rng.uniform(0.8, 1.6) + 2.5 * atrophy
    offset = rng.normal(0.0, 1.5)  # scanner calibration shift of soft tissue (HU)
    white = rng.uniform(25.0, 30.0) + offset
    return {
        "age": age, "atrophy": atrophy,
        "axes_mm": _MEAN_AXES_MM * mode.scale * rng.uniform(0.93, 1.07, size=3),
        # depth (mm from the scalp surface) where each next layer starts
        "bounds_mm": np.cumsum([0.0, scalp, outer, diploe, inner, csf_gap]) * mode.scale,
        # HU of scalp, outer table, diploe, inner table, CSF (after each bound)
        "layer_hu": np.array([rng.uniform(35, 45) + offset, rng.uniform(1000, 1500),
                              rng.uniform(350, 650), rng.uniform(1000, 1500),
                              rng.uniform(2, 8) + offset]),
        "white_hu": white, "grey_hu": white + rng.uniform(8.0, 12.0),
        "deep_hu": white + rng.uniform(6.0, 10.0),
        "cortex_mm": rng.uniform(2.5, 3.5) * mode.scale,
        "gyri": _waves(rng, 2, (25.0 * mode.scale, 40.0 * mode.scale)),
        "sulci": _waves(rng, 3, (18.0 * mode.scale, 30.0 * mode.scale)),
        "sulcus_halfwidth": 0.05 + 0.08 * atrophy,
        "headrest_hu": rng.uniform(150.0, 300.0), "headrest_gap_mm": rng.uniform(2.0, 8.0),
        "pineal_calc": rng.random() < age / 110.0, "plexus_calc": rng.random() < age / 90.0,
    }


def head_depth(point_mm, axes_mm) -> float:
    """First-order depth (mm) of a head-frame point below the head ellipsoid's surface."""
    q = np.asarray(point_mm) / axes_mm
    radius = float(np.linalg.norm(q)) + 1e-9
    return (1.0 - radius) * radius / float(np.linalg.norm(q / axes_mm))


def _lobar_centre(rng, anat: dict, depth_mm: float, mode: Mode) -> np.ndarray:
    """A lobar (superficial, supratentorial, off-midline) centre ``depth_mm`` below the cortex."""
    axes = anat["axes_mm"]
    target = anat["bounds_mm"][-1] + depth_mm
    while True:
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        if -0.05 < u[2] < 0.8 and abs(u[0]) > 0.25:
            break
    lam = 1.0 / np.linalg.norm(u / axes)
    normal = lam * u / axes**2
    cos = float(u @ normal / np.linalg.norm(normal))
    for _ in range(4):
        lam -= (target - head_depth(lam * u, axes)) / cos
    return lam * u


def _sample_site(rng, label: int, anat: dict, radius_mm: float, mode: Mode):
    """``(site name, centre (3,) head mm)`` of the hematoma."""
    if label == 1:
        site = rng.choice(["lobar", "putamen", "thalamus", "caudate"], p=[0.8, 0.08, 0.06, 0.06])
    else:
        site = rng.choice(["lobar", "putamen", "thalamus", "caudate"], p=[0.25, 0.45, 0.22, 0.08])
    if site == "lobar":
        depth = 0.6 * radius_mm + rng.uniform(2.0, 8.0) * mode.scale
        return str(site), _lobar_centre(rng, anat, depth, mode)
    side = rng.choice([-1.0, 1.0])
    base = np.array(DEEP_SITES_MM[site]) * np.array([side, 1.0, 1.0])
    centre = base * anat["axes_mm"] / _MEAN_AXES_MM + rng.normal(0.0, 2.0 * mode.scale, 3)
    return str(site), centre


def _sample_lesion(rng, label: int, anat: dict, mode: Mode) -> dict:
    """Hematoma size, shape, density and the AVM signs (vessels, calcification)."""
    avm = label == 1
    lo, hi = mode.volume_ml
    if mode.max_axis_mm:
        volume = rng.uniform(lo, hi)
    else:
        volume = float(np.clip(rng.lognormal(np.log(11.0 if avm else 17.0), 0.75), lo, hi))
    radius = (3.0 * volume * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
    aspect = np.exp(rng.normal(0.0, 0.15, 3))
    amplitude = rng.uniform(0.08, 0.35) if avm else rng.uniform(0.02, 0.14)
    axes = radius * aspect / np.prod(aspect) ** (1.0 / 3.0)
    if mode.max_axis_mm:
        amplitude = min(amplitude, 0.15)
        axes *= min(1.0, mode.max_axis_mm / (axes.max() * (1.0 + amplitude)))
    site, centre = _sample_site(rng, label, anat, radius, mode)
    n_lobes = 4
    dirs = rng.normal(size=(n_lobes, 3))
    return {
        "site": site, "centre": centre, "axes": axes, "rot": _rotation(rng),
        "lobes": (dirs / np.linalg.norm(dirs, axis=1, keepdims=True),
                  rng.uniform(2.0, 5.0, n_lobes), rng.uniform(0, 2 * np.pi, n_lobes), amplitude),
        "irregularity": amplitude,
        "hu": rng.uniform(50.0, 75.0) if avm else rng.uniform(58.0, 82.0),
        "texture_hu": rng.uniform(5.0, 22.0) if avm else rng.uniform(2.0, 8.0),
        "texture": _waves(rng, 3, (5.0, 12.0)),
        "edema_mm": rng.uniform(1.0, 4.0 if avm else 7.0) if rng.random() < (0.4 if avm else 0.9)
        else 0.0,
        "edema_drop_hu": rng.uniform(6.0, 11.0),
        "n_vessels": int(rng.choice(6, p=[0.15, 0.1, 0.25, 0.25, 0.15, 0.1])) if avm
        else int(rng.random() < 0.05),
        "vessel_hu": rng.uniform(50.0, 68.0),
        "n_calcs": int(rng.integers(1, 4)) if rng.random() < (0.35 if avm else 0.05) else 0,
    }


def _sample_scanner(rng, anat: dict, mode: Mode) -> tuple[Grid, dict]:
    """The scanner grid: spacing, voxel order (RAS/LPS-like), gantry tilt, head pose."""
    s_ip = round(float(rng.uniform(*mode.spacing_mm)), 4)
    s_k = float(rng.choice(mode.slice_mm))
    flips = rng.choice([[1, 1, 1], [-1, -1, 1], [-1, -1, -1], [1, -1, 1]], p=[.3, .4, .15, .15])
    tilt = float(rng.uniform(-15.0, 15.0)) if rng.random() < 0.35 else 0.0
    t = np.deg2rad(tilt)
    gantry = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    lin = gantry @ np.diag(np.array(flips) * [s_ip, s_ip, s_k])
    pose = _rotation(rng, max_deg=5.0)
    head_centre = rng.normal(0.0, 5.0, 3) + [0.0, 20.0, 0.0]
    axes, scale = anat["axes_mm"], mode.scale
    back = axes[1] + anat["headrest_gap_mm"] + 6.0 * scale  # headrest behind the occiput
    z_lo, z_hi = -30.0 * scale, axes[2] + 3.0 * scale
    extent = np.array([2 * axes[0] * 1.12 + 10 * scale, (axes[1] + back) * 1.12 + 10 * scale])
    shape = (*np.ceil(extent / s_ip).astype(int), int(np.ceil((z_hi - z_lo) / s_k)) + 1)
    fov_centre = head_centre + pose @ [0.0, (axes[1] - back) / 2, (z_lo + z_hi) / 2]
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = fov_centre - lin @ ((np.array(shape) - 1) / 2.0)
    head_from_world = np.eye(4)
    head_from_world[:3, :3] = pose.T
    head_from_world[:3, 3] = -pose.T @ head_centre
    intercept = float(rng.choice([-1024.0, 0.0]))
    facts = {"spacing_mm": s_ip, "slice_mm": s_k, "n_slices": shape[2], "tilt_deg": round(tilt, 2),
             "noise_hu": rng.uniform(4.0, 6.0), "intercept": intercept}
    return Grid(shape, affine, head_from_world), facts


def _vessel_path(rng, lesion: dict, anat: dict, mode: Mode) -> tuple[np.ndarray, float]:
    """A serpiginous vessel: ``(points (n, 3) head mm, radius mm)`` starting at the clot."""
    u = rng.normal(size=3)
    u /= np.linalg.norm(u)
    outward = lesion["rot"] @ u
    point = lesion["centre"] + lesion["rot"] @ (lesion["axes"] * u) * 1.1
    direction = rng.normal(size=3)
    direction -= (direction @ outward) * outward
    direction = direction / np.linalg.norm(direction) + 0.4 * outward
    step = max(1.0, 2.0 * mode.scale) if mode.max_axis_mm else 1.0
    n_steps = int(rng.integers(12, 40))
    radius = float(rng.uniform(0.9, 2.0)) * (1.3 if mode.max_axis_mm else 1.0)
    min_depth = anat["bounds_mm"][-1] + 1.5 * mode.scale
    points = []
    for _ in range(n_steps):
        if head_depth(point, anat["axes_mm"]) < min_depth + radius:
            break
        points.append(point.copy())
        direction = direction / np.linalg.norm(direction) + rng.normal(0.0, 0.45, 3)
        point = point + step * direction / np.linalg.norm(direction)
    return np.array(points).reshape(-1, 3), radius


def _sample_avm_signs(rng, lesion: dict, anat: dict, mode: Mode) -> None:
    """Add ``vessels`` (paths) and ``calcs`` (points, radii, HU) beside the clot to ``lesion``."""
    lesion["vessels"] = [_vessel_path(rng, lesion, anat, mode) for _ in range(lesion["n_vessels"])]
    calcs = []
    for _ in range(lesion["n_calcs"]):
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        point = lesion["centre"] + lesion["rot"] @ (lesion["axes"] * u) * 1.15
        calcs.append((point, float(rng.uniform(0.8, 2.0)), float(rng.uniform(200.0, 600.0))))
    lesion["calcs"] = calcs


def sample_subject(index: int, label: int, seed: int, mode: Mode):
    """All random choices of one subject: ``(anatomy, lesion, grid, scanner facts, rng)``.

    The generator is ``default_rng([seed, index])``; the returned rng continues it (noise).
    """
    rng = np.random.default_rng([seed, index])
    if label == 1:
        age = float(np.clip(rng.normal(35.0, 13.0), 12.0, 75.0))
    else:
        age = float(np.clip(rng.normal(62.0, 11.0), 30.0, 90.0))
    anat = _sample_anatomy(rng, age, mode)
    lesion = _sample_lesion(rng, label, anat, mode)
    _sample_avm_signs(rng, lesion, anat, mode)
    grid, scanner = _sample_scanner(rng, anat, mode)
    return anat, lesion, grid, scanner, rng


# --------------------------------------------------------------------------- rendering
def _render_head(grid: Grid, anat: dict):
    """Scalp, skull and CSF layers: ``(hu, brain_depth_mm, brain_fraction, step_width_mm)``."""
    whole = (slice(None),) * 3
    depth, width = ellipsoid(grid, whole, (0.0, 0.0, 0.0), anat["axes_mm"])
    hu = np.full(grid.shape, AIR_HU, dtype=np.float32)
    previous = AIR_HU
    for bound, value in zip(anat["bounds_mm"][:-1], anat["layer_hu"], strict=True):
        hu += np.float32(value - previous) * soft_step(depth - np.float32(bound), width)
        previous = value
    brain_depth = depth - np.float32(anat["bounds_mm"][-1])
    return hu, brain_depth, soft_step(brain_depth, width), width


def deep_structures(anat: dict) -> list[tuple[tuple, tuple, float]]:
    """``(centre mm, semi-axes mm, HU)`` of deep grey nuclei then ventricles (head frame)."""
    a, csf, deep = anat["atrophy"], anat["layer_hu"][-1], anat["deep_hu"]
    size = anat["axes_mm"] / _MEAN_AXES_MM
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
    scale = anat["axes_mm"] / _MEAN_AXES_MM
    s_ip = np.float32(grid.spacing_mm[0])
    half_width = np.float32((0.6 + 1.8 * anat["atrophy"]) * scale[0])
    ax = np.abs(grid.x)
    callosum = (grid.y / np.float32(40 * scale[1])) ** 2 + ((grid.z - np.float32(10 * scale[2]))
                                                           / np.float32(16 * scale[2])) ** 2
    fissure = soft_step(half_width - ax, s_ip) * (callosum > 1.0)
    hu += (np.float32(anat["layer_hu"][-1]) - hu) * fissure
    hu += (np.float32(anat["grey_hu"] + 20.0) - hu) * fissure * soft_step(0.3 - ax, s_ip)


def _render_brain(grid: Grid, anat: dict, brain_depth: np.ndarray, width: np.ndarray):
    """``(I, J, K)`` HU of the brain: grey/white, sulci, deep nuclei, ventricles, falx."""
    x, y, z = grid.x, grid.y, grid.z
    scale = anat["axes_mm"][0] / _MEAN_AXES_MM[0]
    cortex = np.float32(anat["cortex_mm"]) * (1.0 + 0.4 * wave_field(x, y, z, anat["gyri"]))
    white, grey = np.float32(anat["white_hu"]), np.float32(anat["grey_hu"])
    hu = white + (grey - white) * soft_step(cortex - brain_depth, width)
    lines = np.abs(wave_field(x, y, z, anat["sulci"])) / np.float32(anat["sulcus_halfwidth"])
    sulci = np.clip(1.0 - lines, 0.0, 1.0) * soft_step(np.float32(10 * scale) - brain_depth, width)
    hu += (np.float32(anat["layer_hu"][-1]) - hu) * sulci
    for centre, axes, value in deep_structures(anat):
        box = grid.box(centre, axes.max() + grid.spacing_mm[2])
        if box is None:
            continue
        depth, w = ellipsoid(grid, box, centre, axes)
        hu[box] += (np.float32(value) - hu[box]) * soft_step(depth, w)
    _render_midline(grid, anat, hu)
    return hu


def _blob(grid: Grid, hu: np.ndarray, centre, radius_mm: float, value_hu: float,
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


def _render_lesion(grid: Grid, lesion: dict, anat: dict, hu: np.ndarray,
                   brain_depth: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Blend the hematoma, its edema rim and AVM signs into ``hu``; return its fraction.

    Returns ``(I, J, K)`` float32 blood fraction per voxel (the mask is fraction >= 0.5).
    """
    axes, amplitude = lesion["axes"], lesion["lobes"][3]
    reach = axes.max() * (1.0 + amplitude) + lesion["edema_mm"] + grid.spacing_mm[2]
    box = grid.box(lesion["centre"], reach)
    blood = np.zeros(grid.shape, dtype=np.float32)
    if box is None:
        return blood
    depth, w = ellipsoid(grid, box, lesion["centre"], axes, lesion["rot"], lesion["lobes"])
    margin = np.float32(anat["axes_mm"][0] / _MEAN_AXES_MM[0])  # 1 mm at full size
    inside_brain = soft_step(brain_depth[box] - margin, width[box])
    frac = soft_step(depth, w) * inside_brain
    if lesion["edema_mm"] > 0:
        rim = soft_step(depth + np.float32(lesion["edema_mm"]), w) * (1.0 - frac) * inside_brain
        edema_hu = np.float32(anat["white_hu"] - lesion["edema_drop_hu"])
        hu[box] += (edema_hu - hu[box]) * rim
    clot = np.float32(lesion["hu"]) + np.float32(lesion["texture_hu"]) * wave_field(
        *grid.coords(box), lesion["texture"])
    hu[box] += (clot - hu[box]) * frac
    blood[box] = frac
    return blood


def _blobs(anat: dict, lesion: dict) -> list[tuple[np.ndarray, float, float]]:
    """``(centre mm, radius mm, HU)`` of the small bright spheres: AVM vessels (as chains),
    calcifications beside the clot, and age-related pineal/choroid plexus calcification."""
    blobs = [(point, radius, lesion["vessel_hu"])
             for points, radius in lesion["vessels"] for point in points]
    blobs += lesion["calcs"]
    scale = anat["axes_mm"] / _MEAN_AXES_MM
    if anat["pineal_calc"]:
        blobs.append((np.array([0.0, -22.0, 4.0]) * scale, 2.5 * scale[0], 350.0))
    if anat["plexus_calc"]:
        blobs += [(np.array([s * 15.0, -26.0, 10.0]) * scale, 2.5 * scale[0], 250.0)
                  for s in (-1, 1)]
    return blobs


def _render_headrest(grid: Grid, anat: dict, hu: np.ndarray) -> None:
    """A plastic headrest plate behind the occiput (not head, for skull stripping), in place."""
    axes, s_ip = anat["axes_mm"], np.float32(grid.spacing_mm[0])
    front = np.float32(-(axes[1] + anat["headrest_gap_mm"]))
    thick = np.float32(HEADREST_MM)
    plate = (soft_step(front - grid.y, s_ip) * soft_step(grid.y - (front - thick), s_ip)
             * soft_step(np.float32(0.8 * axes[0]) - np.abs(grid.x), s_ip))
    hu += (np.float32(anat["headrest_hu"]) - hu) * plate


def _render_slab(grid: Grid, anat: dict, lesion: dict):
    """Noise-free, unblurred scan of (a slab of) the grid: ``(hu, blood fraction)``."""
    hu, brain_depth, brain_fraction, width = _render_head(grid, anat)
    brain = _render_brain(grid, anat, brain_depth, width)
    blood = _render_lesion(grid, lesion, anat, brain, brain_depth, width)
    hu += brain_fraction * (brain - np.float32(anat["layer_hu"][-1]))
    _render_headrest(grid, anat, hu)
    return hu, blood


def _render_phantom(grid: Grid, anat: dict, lesion: dict):
    """The noise-free scan on ``grid``, a few slices at a time: ``(hu, blood fraction)``."""
    hu = np.empty(grid.shape, dtype=np.float32)
    blood = np.empty(grid.shape, dtype=np.float32)
    step = max(1, SLAB_VOXELS // (grid.shape[0] * grid.shape[1]))
    for k0 in range(0, grid.shape[2], step):
        k1 = min(k0 + step, grid.shape[2])
        hu[..., k0:k1], blood[..., k0:k1] = _render_slab(grid.slab(k0, k1), anat, lesion)
    for centre, radius, value in _blobs(anat, lesion):
        _blob(grid, hu, centre, radius, value, keep_out=blood)
    return hu, blood


def upsample_inplane(a: np.ndarray, factor: int, shape: tuple) -> np.ndarray:
    """Linear interpolation of ``a`` to a ``factor``-times finer grid along axes 0 and 1.

    Coarse voxel ``c`` is centred on fine index ``factor * c + (factor - 1) / 2`` (see
    :meth:`Grid.coarse`); edges are held. The result is cropped to ``shape``.
    """
    for axis in (0, 1):
        coarse = np.arange(a.shape[axis], dtype=np.float64) * factor + (factor - 1) / 2
        fine = np.clip(np.arange(shape[axis]), coarse[0], coarse[-1])
        lo = np.minimum(np.searchsorted(coarse, fine, side="right") - 1, a.shape[axis] - 2)
        lo = np.maximum(lo, 0)
        weight = ((fine - coarse[lo]) / factor).astype(np.float32)
        view = [None, None, None]
        view[axis] = slice(None)
        weight = weight[tuple(view)]
        a = np.take(a, lo, axis) * (1 - weight) + np.take(a, lo + 1, axis) * weight
    return a


def render_subject(index: int, label: int, seed: int, mode: Mode):
    """One subject's scan: ``(hu (I, J, K) float32, mask (I, J, K) uint8, grid, facts)``.

    Rendered a few slices at a time (small temporaries stay in cache). ``hu`` is
    quantised to whole HU and clipped at -1024 like a CT scanner's output.
    """
    anat, lesion, grid, scanner, rng = sample_subject(index, label, seed, mode)
    hu, blood = _render_phantom(grid.coarse(mode.phantom_step), anat, lesion)
    if mode.phantom_step > 1:
        hu, blood = (upsample_inplane(a, mode.phantom_step, grid.shape) for a in (hu, blood))
    if mode.blur_mm > 0:
        sigma = mode.blur_mm / grid.spacing_mm[0]
        hu = ndimage.gaussian_filter(hu, sigma=(sigma, sigma, 0.0), mode="nearest")
    noise = rng.standard_normal(grid.shape, dtype=np.float32)
    noise *= np.float32(scanner["noise_hu"])
    hu += noise
    np.maximum(np.rint(hu, out=hu), np.float32(-1024.0), out=hu)
    mask = (blood >= 0.5).astype(np.uint8)
    facts = _lesion_facts(grid, mask, hu, anat)
    facts.update(age=round(anat["age"], 1), site=lesion["site"],
                 irregularity=round(lesion["irregularity"], 3),
                 edema_mm=round(lesion["edema_mm"], 2), n_vessels=len(lesion["vessels"]),
                 calcified=int(bool(lesion["calcs"])), spacing_mm=scanner["spacing_mm"],
                 slice_mm=scanner["slice_mm"], n_slices=scanner["n_slices"],
                 tilt_deg=scanner["tilt_deg"], intercept=scanner["intercept"])
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


# --------------------------------------------------------------------------- cohort
def subject_ids(n_subjects: int) -> list[str]:
    """``sub-001``, ``sub-002``, ... (at least 3 digits)."""
    digits = max(3, len(str(n_subjects)))
    return [f"sub-{i + 1:0{digits}d}" for i in range(n_subjects)]


def cohort_labels(n_subjects: int, n_avm: int, seed: int) -> np.ndarray:
    """``(n_subjects,)`` int labels, ``n_avm`` ones at seeded random positions."""
    labels = np.zeros(n_subjects, dtype=int)
    labels[np.random.default_rng(seed).permutation(n_subjects)[:n_avm]] = 1
    return labels


def write_subject(out_dir: Path, subject_id: str, index: int, label: int, seed: int,
                  small: bool) -> dict:
    """Render subject ``index`` and write ``images/<id>.nii.gz`` and ``masks/<id>.nii.gz``.

    The image is int16 with scl_slope 1 and scl_inter 0 or -1024 (as DICOM converters
    write CT). Returns the subject's facts (a row of ``subjects.csv``).
    """
    hu, mask, grid, facts = render_subject(index, label, seed, SMALL if small else FULL)
    intercept = facts.pop("intercept")
    stored = (hu - np.float32(intercept)).astype(np.int16)
    nifti.save(out_dir / "images" / f"{subject_id}.nii.gz", stored, grid.affine,
               slope=1.0, inter=intercept)
    nifti.save(out_dir / "masks" / f"{subject_id}.nii.gz", mask, grid.affine)
    orientation = "".join(nib.aff2axcodes(grid.affine))
    return {"subject_id": subject_id, "label": int(label), "orientation": orientation, **facts}


def _check_options(n_subjects: int, n_avm: int, seed: int) -> None:
    if n_subjects < 2:
        raise InputError(f"--subjects: must be at least 2, got {n_subjects}")
    if not 0 <= n_avm <= n_subjects:
        raise InputError(f"--avm: must be in 0..{n_subjects} (--subjects), got {n_avm}")
    if seed < 0:
        raise InputError(f"--seed: must be >= 0, got {seed}")


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a folder that is not an earlier synthetic cohort."""
    if out_dir.exists() and (not out_dir.is_dir() or (
            any(out_dir.iterdir()) and not (out_dir / FACTS_NAME).is_file())):
        raise InputError(f"{out_dir}: exists and is not a synthetic cohort; choose a new folder")


def _render_all(out_dir: Path, labels: np.ndarray, seed: int, small: bool,
                workers: int) -> list[dict]:
    """Write every subject into ``out_dir`` (``workers`` processes); their facts, in order."""
    ids = subject_ids(len(labels))
    jobs = [(out_dir, ids[i], i, int(labels[i]), seed, small) for i in range(len(labels))]
    if workers <= 1:
        return [write_subject(*job) for job in jobs]
    context = multiprocessing.get_context("spawn")  # safe even if the caller holds JAX threads
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(write_subject, *job) for job in jobs]
        return [future.result() for future in futures]


def _write_tables(out_dir: Path, facts: list[dict]) -> None:
    """``manifest.csv`` (SPEC.md) and ``subjects.csv`` (generation facts) in ``out_dir``."""
    with open(out_dir / MANIFEST_NAME, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subject_id", "image", "mask", "label"])
        for row in facts:
            sid = row["subject_id"]
            writer.writerow([sid, f"images/{sid}.nii.gz", f"masks/{sid}.nii.gz", row["label"]])
    with open(out_dir / FACTS_NAME, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FACT_FIELDS)
        writer.writeheader()
        writer.writerows(facts)


def generate_cohort(out_dir: str | Path, n_subjects: int = 80, n_avm: int = 38, seed: int = 0,
                    small: bool = False, workers: int | None = None) -> Path:
    """Write a synthetic cohort into ``out_dir`` atomically; return its ``manifest.csv``.

    ``out_dir`` gets ``images/``, ``masks/``, ``manifest.csv`` and ``subjects.csv`` (one
    row of generation facts per subject: volume_ml, site, age, ...). An existing earlier
    cohort there is replaced once the new one is complete. ``workers`` processes render
    subjects in parallel (default: all CPUs for full-size scans, 1 for ``small``).
    """
    _check_options(n_subjects, n_avm, seed)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    if workers is None:
        workers = 1 if small else min(os.cpu_count() or 1, n_subjects)
    labels = cohort_labels(n_subjects, n_avm, seed)
    with atomic_dir(out_dir) as tmp:
        facts = _render_all(tmp, labels, seed, small, workers)
        _write_tables(tmp, facts)
    return out_dir / MANIFEST_NAME


def default_manifest(data_cfg) -> Path:
    """The built-in cohort of ``data_cfg.synth_*``, generated on first use, cached.

    Lives in ``cache_root(data_cfg)/synth/<parameters>/``; a lock file makes concurrent
    first uses generate it once, and the folder appears atomically.
    """
    small = "-small" if data_cfg.synth_small else ""
    name = (f"v{GENERATOR_VERSION}-n{data_cfg.synth_subjects}-avm{data_cfg.synth_avm}"
            f"-seed{data_cfg.synth_seed}{small}")
    out = cache.cache_root(data_cfg) / "synth" / name
    manifest = out / MANIFEST_NAME
    if manifest.is_file():
        return manifest
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not manifest.is_file():
            log.info("generating the built-in synthetic cohort in %s (first use)", out)
            generate_cohort(out, data_cfg.synth_subjects, data_cfg.synth_avm,
                            data_cfg.synth_seed, data_cfg.synth_small)
    return manifest


def main(argv=None) -> int:
    """``python -m mlssp_jax.synth --out DIR [--subjects 80 --avm 38 --seed 0 --small]``."""
    parser = ArgumentParser(prog="python -m mlssp_jax.synth",
                            description="Write a synthetic head-CT cohort (SPEC.md manifest).")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--subjects", type=int, default=80, help="number of subjects")
    parser.add_argument("--avm", type=int, default=38, help="how many are AVM-related (label 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--small", action="store_true",
                        help="half-size heads on a coarse grid (fast; for tests)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes (default: all CPUs; 1 with --small)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers: must be >= 1, got {args.workers}")
    setup_logging()
    start = time.perf_counter()
    manifest = generate_cohort(args.out, args.subjects, args.avm, args.seed, args.small,
                               args.workers)
    log.info("wrote %d subjects (%d AVM) to %s in %.1f s", args.subjects, args.avm, manifest,
             time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
