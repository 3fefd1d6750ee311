"""Reading one DICOM CT series from a folder into a :class:`~mlssp_jax.nifti.Volume`.

pydicom reads the files; the series is assembled here, with every check a converter makes:

- Files: every regular file in the folder (not recursive). Files that are not DICOM (no
  ``DICM`` preamble: notes, ``.DS_Store``) and a ``DICOMDIR`` are skipped with a warning;
  localizer (scout) images are skipped too. A DICOM file that is not a single-frame CT image
  (another modality, a report, no pixel data, a multi-frame file) is an error naming it.
- Series: all files must share one ``SeriesInstanceUID``; several series in one folder is
  an error naming each UID, its description and file count.
- Geometry: every slice must share ``ImageOrientationPatient``, ``PixelSpacing``, ``Rows`` and
  ``Columns``. Slices are ordered by ``ImagePositionPatient`` projected on the slice normal
  (row x column direction), never by file name or ``InstanceNumber``. Two slices at one
  position, a missing slice (a gap of about twice the spacing) or otherwise non-uniform
  spacing is an error naming the files: we do not resample, as that would invent data.
- Gantry tilt: the slice-to-slice step is taken from the positions themselves, so a tilted
  acquisition (each slice offset not along the normal) gives a sheared affine, exact; the
  positions must lie on one line (within ``POSITION_ATOL_MM``).
- Values: ``RescaleSlope``/``RescaleIntercept`` applied per slice (float32 HU).

The volume's voxel axes are (column, row, slice) of the DICOM pixel arrays, and its affine
maps them to world RAS+ mm (DICOM's LPS with x and y negated), as dcm2niix and nibabel do.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from mlssp_jax.errors import InputError
from mlssp_jax.nifti import Volume

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
POSITION_ATOL_MM = 0.05  # slices closer than this along the normal are at one position
SPACING_RTOL = 0.01  # slice gaps may differ from the median by this fraction (+ the atol)
ORIENTATION_ATOL = 1e-4  # direction cosines of two slices agree to this
SKIPPED_NAMES = ("DICOMDIR",)
DEFER_BYTES = 1024  # elements larger than this (pixel data) are read only when used


@dataclass
class _Slice:
    """One image file: its path, dataset (pixels not decoded yet) and position (LPS mm)."""

    path: Path
    ds: pydicom.Dataset
    position: np.ndarray


def _candidate_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return [p for p in files if p.name.upper() not in SKIPPED_NAMES]


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` starts with the DICOM preamble (128 bytes, then ``DICM``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def holds_dicom(folder: Path) -> bool:
    """Whether the folder holds at least one DICOM file (not looking into subfolders)."""
    return any(is_dicom_file(p) for p in _candidate_files(folder))


def _read(path: Path) -> pydicom.Dataset | None:
    """The dataset of a DICOM file, None for a file that is not DICOM (skipped)."""
    if not is_dicom_file(path):
        log.warning("%s: not a DICOM file; skipped", path)
        return None
    try:
        return pydicom.dcmread(path, defer_size=DEFER_BYTES)
    except (InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise InputError(f"{path}: unreadable DICOM file ({err})") from None


def _check_ct_image(path: Path, ds: pydicom.Dataset) -> None:
    modality = ds.get("Modality")
    if modality != "CT":
        raise InputError(f"{path}: not a CT image (Modality {modality!r}); the series folder "
                         "must hold only CT slices")
    if "PixelData" not in ds:
        raise InputError(f"{path}: CT file without pixel data")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise InputError(f"{path}: multi-frame (enhanced) CT is not supported; export "
                         "single-frame slices")
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                    "SeriesInstanceUID"):
        if ds.get(keyword) in (None, ""):
            raise InputError(f"{path}: no {keyword}")


def _is_localizer(ds: pydicom.Dataset) -> bool:
    return "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]


def _series_files(folder: Path) -> list[_Slice]:
    """The CT image slices of the folder's one series (unordered), all checked."""
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    slices = []
    for path in _candidate_files(folder):
        ds = _read(path)
        if ds is None:
            continue
        _check_ct_image(path, ds)
        if _is_localizer(ds):
            log.warning("%s: localizer image; skipped", path)
            continue
        slices.append(_Slice(path, ds, np.asarray(ds.ImagePositionPatient, np.float64)))
    if not slices:
        raise InputError(f"{folder}: no DICOM CT image in the folder")
    _check_one_series(folder, slices)
    return slices


def _check_one_series(folder: Path, slices: list[_Slice]) -> None:
    series = defaultdict(list)
    for s in slices:
        series[str(s.ds.SeriesInstanceUID)].append(s)
    if len(series) > 1:
        found = "; ".join(f"{uid} ({members[0].ds.get('SeriesDescription', '')!s}, "
                          f"{len(members)} files)" for uid, members in series.items())
        raise InputError(f"{folder}: holds {len(series)} series, put each in its own folder: "
                         f"{found}")


def _in_plane(folder: Path, slices: list[_Slice]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column direction cosines (LPS) and pixel spacing ``(row, column)`` in mm."""
    first = slices[0].ds
    cosines = np.asarray(first.ImageOrientationPatient, np.float64)
    spacing = np.asarray(first.PixelSpacing, np.float64)
    shape = (int(first.Rows), int(first.Columns))
    for s in slices[1:]:
        if not np.allclose(np.asarray(s.ds.ImageOrientationPatient, np.float64), cosines,
                           atol=ORIENTATION_ATOL):
            raise InputError(f"{s.path}: ImageOrientationPatient differs from {slices[0].path}")
        if not np.allclose(np.asarray(s.ds.PixelSpacing, np.float64), spacing, rtol=1e-4):
            raise InputError(f"{s.path}: PixelSpacing differs from {slices[0].path}")
        if (int(s.ds.Rows), int(s.ds.Columns)) != shape:
            raise InputError(f"{s.path}: {s.ds.Rows}x{s.ds.Columns} pixels, "
                             f"{slices[0].path} has {shape[0]}x{shape[1]}")
    row, col = cosines[:3], cosines[3:]
    if (abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3
            or abs(row @ col) > 1e-3):
        raise InputError(f"{slices[0].path}: ImageOrientationPatient {cosines.tolist()} is not "
                         "two orthogonal unit vectors")
    if (spacing <= 0).any():
        raise InputError(f"{slices[0].path}: PixelSpacing {spacing.tolist()} must be positive")
    return cosines.reshape(2, 3), spacing


def _order(folder: Path, slices: list[_Slice], normal: np.ndarray) -> tuple[list[_Slice],
                                                                           np.ndarray]:
    """Slices sorted along ``normal``, and the step between neighbours (LPS mm vector)."""
    if len(slices) < 2:
        raise InputError(f"{folder}: only one CT slice; a series needs at least 2")
    slices = sorted(slices, key=lambda s: float(s.position @ normal))
    depth = np.array([s.position @ normal for s in slices])
    gaps = np.diff(depth)
    for n, gap in enumerate(gaps):
        if gap < POSITION_ATOL_MM:
            raise InputError(f"{slices[n].path} and {slices[n + 1].path}: two slices at one "
                             f"position ({depth[n]:.2f} mm along the normal)")
    step = float(np.median(gaps))
    tol = POSITION_ATOL_MM + SPACING_RTOL * step
    for n, gap in enumerate(gaps):
        if abs(gap - step) > tol:
            kind = ("missing slice(s)" if gap > 1.5 * step
                    else "non-uniform slice spacing (not resampled)")
            raise InputError(f"{folder}: {kind}: {gap:.3f} mm between {slices[n].path.name} and "
                             f"{slices[n + 1].path.name}, the series' spacing is {step:.3f} mm")
    return slices, _check_line(folder, slices)


def _check_line(folder: Path, slices: list[_Slice]) -> np.ndarray:
    """The step vector from the first to the last position; all positions must lie on it."""
    first, last = slices[0].position, slices[-1].position
    step = (last - first) / (len(slices) - 1)
    for n, s in enumerate(slices):
        off = float(np.linalg.norm(s.position - (first + n * step)))
        if off > POSITION_ATOL_MM + SPACING_RTOL * float(np.linalg.norm(step)):
            raise InputError(f"{s.path}: ImagePositionPatient is {off:.2f} mm off the line "
                             f"through the other slices of {folder}")
    return step


def _pixels(s: _Slice) -> np.ndarray:
    """``(rows, columns)`` float32 HU of one slice (rescale slope and intercept applied)."""
    try:
        stored = s.ds.pixel_array
    except Exception as err:  # pydicom raises many kinds for undecodable pixel data
        raise InputError(f"{s.path}: cannot decode the pixel data ({err})") from None
    slope = float(s.ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(s.ds.get("RescaleIntercept", 0.0) or 0.0)
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _assemble(folder: Path) -> tuple[list[_Slice], np.ndarray]:
    """The series' slices in order along the normal and the RAS+ affine (4, 4)."""
    slices = _series_files(folder)
    (row_dir, col_dir), (row_mm, col_mm) = _in_plane(folder, slices)
    slices, step = _order(folder, slices, np.cross(row_dir, col_dir))
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_mm  # along a row: column index increases
    lps[:3, 1] = col_dir * row_mm  # down a column: row index increases
    lps[:3, 2] = step
    lps[:3, 3] = slices[0].position
    return slices, LPS_TO_RAS @ lps


def read_series(folder: str | Path) -> Volume:
    """The CT series in ``folder`` as a Volume: ``(columns, rows, slices)`` float32 HU.

    The affine maps (column, row, slice) indices to world RAS+ mm; its third column is the
    step between slice positions, so a gantry tilt shears it. Raises InputError (naming the
    folder or file) for the problems listed in the module docstring.
    """
    folder = Path(folder)
    slices, affine = _assemble(folder)
    data = np.stack([_pixels(s).T for s in slices], axis=-1)
    return Volume(data=np.ascontiguousarray(data), affine=affine, path=folder)


def check_series(folder: str | Path) -> None:
    """Every check of :func:`read_series` but decoding the pixels (the headers are read)."""
    _assemble(Path(folder))


def sorted_datasets(folder: str | Path) -> list[pydicom.Dataset]:
    """The series' datasets in the slice order of :func:`read_series` (slice k = index k)."""
    return [s.ds for s in _assemble(Path(folder))[0]]
