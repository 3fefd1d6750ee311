"""``O/<name>_overlay.png``: a few axial slices of a scan with its predicted lesion outlined.

Slices are drawn on the input's own grid (no resampling): the voxel axis closest to world z
is axial (:func:`measurements.axial_axis`), each slice shown in radiological convention
(patient's right on the left, anterior up) with the pixel aspect of its spacing, CT window
``WINDOW_HU``. The slices are spread over the lesion's extent (through the middle of the
scan if nothing was found), the ABC/2 slice among them with A and B drawn. The title gives
the voxel volume, ABC/2 and their difference, and the AVM probability and label.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from mlssp_jax import measurements
from mlssp_jax.fileio import atomic_path

WINDOW_HU = (0.0, 100.0)
HEAD_HU = -300.0  # panels are cropped to the voxels above this (the head), plus a margin
CROP_MARGIN = 4  # voxels
PANELS = 4
PANEL_INCHES = 3.2
TITLE_INCHES = 0.75
DPI = 100
LABEL_NAMES = {0: "other", 1: "AVM"}


def figure_size_px() -> tuple[int, int]:
    """``(width, height)`` of the PNG in pixels."""
    return int(PANELS * PANEL_INCHES * DPI), int((PANEL_INCHES + TITLE_INCHES) * DPI)


def pick_slices(mask: np.ndarray, axis: int, anchor: int | None) -> list[int]:
    """Up to ``PANELS`` slice indices along ``axis`` spread over the lesion, ``anchor`` included."""
    with_lesion = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
    if with_lesion.size == 0:
        n = mask.shape[axis]
        return sorted({int(round(x)) for x in np.linspace(0.3 * n, 0.7 * n, PANELS)})
    spread = np.linspace(with_lesion[0], with_lesion[-1], PANELS + 2)[1:-1]
    picks = {int(with_lesion[np.argmin(np.abs(with_lesion - s))]) for s in spread}
    if anchor is not None:
        picks.discard(min(picks, key=lambda s: abs(s - anchor)))
        picks.add(anchor)
    return sorted(picks)


def _display(affine: np.ndarray, axis: int) -> tuple[int, int, bool, bool, float]:
    """How to show a slice: (row axis, column axis, flip rows, flip columns, aspect)."""
    plane = [a for a in range(3) if a != axis]
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    col = max(plane, key=lambda a: abs(directions[0, a]))  # closest to x: left-right
    row = plane[0] if col == plane[1] else plane[1]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    # radiological: +x (patient's right) on the left, +y (anterior) at the top
    return row, col, directions[1, row] > 0, directions[0, col] > 0, spacing[row] / spacing[col]


def _oriented(plane_2d: np.ndarray, plane_axes: list[int], row: int, flip_r: bool,
              flip_c: bool) -> np.ndarray:
    shown = plane_2d if plane_axes[0] == row else plane_2d.T
    return shown[::-1 if flip_r else 1, ::-1 if flip_c else 1]


def axial_view(data: np.ndarray, affine: np.ndarray, index: int) -> tuple[np.ndarray, float]:
    """Axial slice ``index`` of ``(I, J, K)`` ``data`` as shown: rows run anterior to posterior,
    columns from the patient's right to left; and the pixel aspect (height / width)."""
    axis = measurements.axial_axis(affine)
    plane = [a for a in range(3) if a != axis]
    row, _, flip_r, flip_c, aspect = _display(affine, axis)
    plane_2d = data[(slice(None),) * axis + (index,)]  # a view: np.take would first copy the
    return _oriented(plane_2d, plane, row, flip_r, flip_c), aspect  # volume (~0.1 s a slice)


def _to_display(ends: np.ndarray, plane_axes: list[int], row: int, shape: tuple[int, int],
                flip_r: bool, flip_c: bool) -> tuple[np.ndarray, np.ndarray]:
    """x (column) and y (row) display coordinates of points given in (plane[0], plane[1])."""
    r, c = (ends[:, 0], ends[:, 1]) if plane_axes[0] == row else (ends[:, 1], ends[:, 0])
    r = shape[0] - 1 - r if flip_r else r
    c = shape[1] - 1 - c if flip_c else c
    return c, r


def _crop(image_hu: np.ndarray, plane: list[int]) -> list[slice]:
    """Per voxel axis, the head's bounding box in the slice plane (everything if no head)."""
    head = image_hu > HEAD_HU
    box = [slice(0, n) for n in image_hu.shape]
    for axis in plane:
        hits = np.flatnonzero(head.any(axis=tuple(a for a in range(3) if a != axis)))
        if hits.size == 0:
            return [slice(0, n) for n in image_hu.shape]
        box[axis] = slice(max(0, hits[0] - CROP_MARGIN), hits[-1] + 1 + CROP_MARGIN)
    return box


def _title(name: str, result: dict, abc: measurements.ABC2 | None) -> str:
    volume = result["volume_ml"]
    lines = [f"{name}: lesion {volume:.1f} mL"]
    if abc is not None:
        lines[0] += (f" | ABC/2 {abc.volume_ml:.1f} mL (difference {abc.volume_ml - volume:+.1f}"
                     " mL)")
        lines.append(f"ABC/2 measures the largest lesion ({abc.lesion_ml:.1f} mL): A "
                     f"{abc.a_mm:.0f} mm (yellow), B {abc.b_mm:.0f} mm (cyan), C "
                     f"{abc.c_mm:.0f} mm")
    prob = result.get("avm_probability")
    if prob is not None:
        lines.append(f"AVM probability {prob:.2f}: {LABEL_NAMES[int(result['label'])]}")
    return "\n".join(lines)


def write_overlay(path, image_hu: np.ndarray, affine: np.ndarray, mask: np.ndarray,
                  result: dict, abc: measurements.ABC2 | None, name: str) -> None:
    """Write the overlay PNG (``figure_size_px()``) atomically.

    ``image_hu`` and ``mask`` are ``(I, J, K)`` on the grid of ``affine``; ``result`` has
    ``volume_ml``, ``avm_probability`` and ``label``; ``abc`` the ABC/2 measurement or None.
    """
    axis = measurements.axial_axis(affine)
    plane = [a for a in range(3) if a != axis]
    row, _, flip_r, flip_c, _ = _display(affine, axis)
    picks = pick_slices(mask, axis, None if abc is None else abc.slice_index)
    crop = _crop(image_hu, plane)
    image_hu, mask = image_hu[tuple(crop)], mask[tuple(crop)]
    width, height = figure_size_px()
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="black")
    axes = fig.subplots(1, PANELS)
    for ax in axes:
        ax.set_axis_off()
    for ax, index in zip(axes, picks, strict=False):
        shown, aspect = axial_view(image_hu, affine, index)
        lesion, _ = axial_view(mask, affine, index)
        ax.imshow(shown, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=aspect,
                  interpolation="nearest")
        if lesion.any():
            ax.contour(lesion.astype(np.float32), levels=[0.5], colors="red", linewidths=0.8)
        if abc is not None and index == abc.slice_index:
            for ends, colour in ((abc.a_ends, "yellow"), (abc.b_ends, "cyan")):
                offset = [crop[plane[0]].start, crop[plane[1]].start]
                x, y = _to_display(ends - offset, plane, row, shown.shape, flip_r, flip_c)
                ax.plot(x, y, color=colour, linewidth=1.4, zorder=3)
        ax.set_title(f"slice {index}", color="white", fontsize=8)
    fig.suptitle(_title(name, result, abc), color="white", fontsize=9, y=0.99, va="top")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, wspace=0.03,
                        top=1 - TITLE_INCHES / (PANEL_INCHES + TITLE_INCHES))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, facecolor="black", format="png")
