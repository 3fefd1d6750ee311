"""Geometry of the phantom: scanner grids, analytic partial volume, ellipsoids, plane waves.

Head coordinates (mm): x left->right, y posterior->anterior, z inferior->superior, origin at
the centre of the head ellipsoid. A boundary is drawn with :func:`soft_step` of a signed
distance over the voxel's extent along the boundary normal, so thick slices blur it.
"""

from __future__ import annotations

import functools

import numpy as np


def soft_step(dist_mm: np.ndarray, width_mm: np.ndarray | float) -> np.ndarray:
    """Partial-volume fraction inside a boundary: ``clip(0.5 + dist / width, 0, 1)``.

    ``dist_mm`` is the signed distance inside (positive) the boundary, ``width_mm`` the
    voxel's extent along the boundary normal.
    """
    return np.clip(np.float32(0.5) + dist_mm / width_mm, 0.0, 1.0)


def rotation(rng: np.random.Generator, max_deg: float | None = None) -> np.ndarray:
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


def waves(rng, n: int, wavelength_mm: tuple) -> tuple[np.ndarray, np.ndarray]:
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


def head_depth(point_mm, axes_mm) -> float:
    """First-order depth (mm) of a head-frame point below the head ellipsoid's surface."""
    q = np.asarray(point_mm) / axes_mm
    radius = float(np.linalg.norm(q)) + 1e-9
    return (1.0 - radius) * radius / float(np.linalg.norm(q / axes_mm))


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


def cylinder(grid: Grid, box, centre_xy, axes_xy):
    """Signed depth (mm) inside a vertical elliptic cylinder and the step width, in ``box``."""
    return ellipsoid(grid, box, (centre_xy[0], centre_xy[1], 0.0), (*axes_xy, 1e5))
