"""Reading and writing NIfTI volumes, with every check SPEC.md asks of an input scan.

A :class:`Volume` is a 3-D array indexed ``(i, j, k)`` (voxel axes) plus the 4x4 affine
that maps a voxel index to world millimetres (RAS+, as nibabel reports it). Images come
back in Hounsfield units (scl_slope/scl_inter applied), masks as 0/1 uint8 on the image's
grid. Bad files raise :class:`~mlssp_jax.errors.InputError` naming the file and the problem.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from mlssp_jax.errors import InputError
from mlssp_jax.fileio import atomic_path

log = logging.getLogger(__name__)

# Two grids agree when their affines match to this (mm, and relative for the matrix part).
AFFINE_ATOL_MM = 1e-3
AFFINE_RTOL = 1e-4
GZIP_LEVEL = 1
_NIFTI1_VOX_OFFSET = 352
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error,
                MemoryError)


@dataclass
class Volume:
    """A 3-D scan or mask.

    Attributes:
      data: ``(I, J, K)`` float32 HU (images) or uint8 0/1 (masks).
      affine: ``(4, 4)`` float64, voxel index -> world mm (RAS+).
      path: the file it was read from.
    """

    data: np.ndarray
    affine: np.ndarray
    path: Path

    @property
    def spacing_mm(self) -> np.ndarray:
        """``(3,)`` voxel edge lengths in mm along the voxel axes i, j, k."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (1 mL = 1000 mm^3)."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0


def _open(path: Path) -> nib.Nifti1Image:
    """nibabel's image for ``path``, or InputError if it is missing or not a NIfTI file."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        img = nib.load(str(path))
    except _READ_ERRORS as err:
        raise InputError(f"{path}: not a readable NIfTI file ({err})") from None
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise InputError(f"{path}: not a NIfTI image ({type(img).__name__})")
    return img


def _check_header(path: Path, img: nib.Nifti1Image) -> np.ndarray:
    """The image's affine (float64), or InputError for a header no grid can be read from."""
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise InputError(f"{path}: bad header: the affine has NaN or infinite entries")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if (spacing < 1e-6).any() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{path}: bad header: voxel spacing {spacing.round(4).tolist()} mm "
                         "gives a singular affine")
    if int(img.header["sform_code"]) == 0 and int(img.header["qform_code"]) == 0:
        log.warning("%s: header has no orientation (qform_code = sform_code = 0); "
                    "using the pixdim-only affine", path)
    kind = img.get_data_dtype().kind
    if kind not in "biuf":
        raise InputError(f"{path}: bad header: unsupported data type {img.get_data_dtype()}")
    return affine


def _squeeze_to_3d(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The 3-D shape to use, accepting trailing singleton dims (e.g. ``(X, Y, Z, 1)``)."""
    if len(shape) > 3 and all(n == 1 for n in shape[3:]):
        log.warning("%s: %d-D with trailing singleton dimensions %s; read as 3-D",
                    path, len(shape), shape)
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"{path}: expected a 3-D image, got shape {tuple(shape)}")
    return tuple(shape)


def read_volume(path: str | Path) -> Volume:
    """Any 3-D NIfTI volume as float32 (scaling applied), header and shape checked only.

    The building block of :func:`load_image` and :func:`load_mask`; use it for files whose
    values need other checks (e.g. 0/255 masks before binarising).
    """
    path = Path(path)
    img = _open(path)
    affine = _check_header(path, img)
    shape = _squeeze_to_3d(path, img.shape)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32).reshape(shape)
    except _READ_ERRORS as err:
        raise InputError(f"{path}: cannot read the voxel data ({err})") from None
    return Volume(data=data, affine=affine, path=path)


def load_image(path: str | Path) -> Volume:
    """Load a CT scan: 3-D, finite, float32 Hounsfield units.

    Raises InputError for a missing or unreadable file, a non-NIfTI file, a bad header,
    a shape that is not 3-D (a trailing singleton 4th dimension is squeezed, with a
    warning) and NaN or infinite voxels.
    """
    return check_image(read_volume(path))


def check_image(volume: Volume) -> Volume:
    """``volume`` if its voxels are finite (InputError naming its path if not); warns when the
    values do not look like Hounsfield units. Shared by NIfTI and DICOM input."""
    path, data = volume.path, volume.data
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise InputError(f"{path}: {bad} voxels are NaN or infinite")
    lo, hi = float(data.min()), float(data.max())
    if hi - lo < 200.0 or lo > -500.0:
        log.warning("%s: values span %.0f..%.0f, which does not look like Hounsfield units "
                    "(air -1000, bone > 500)", path, lo, hi)
    return volume


def same_grid(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two ``(4, 4)`` affines describe the same grid (within the file tolerance)."""
    return bool(np.allclose(a, b, rtol=AFFINE_RTOL, atol=AFFINE_ATOL_MM))


def check_same_grid(mask: Volume, like: Volume) -> None:
    """Raise InputError naming ``mask.path`` unless it has ``like``'s shape and affine."""
    if mask.data.shape != like.data.shape:
        raise InputError(f"{mask.path}: mask shape {mask.data.shape} does not match image "
                         f"{like.path} shape {like.data.shape}")
    if not same_grid(mask.affine, like.affine):
        diff = float(np.abs(mask.affine - like.affine).max())
        raise InputError(f"{mask.path}: mask affine differs from image {like.path} affine "
                         f"(largest difference {diff:.4g})")


def load_mask(path: str | Path, like: Volume, *, require_lesion: bool = True) -> Volume:
    """Load a lesion mask on the grid of image ``like``: ``(I, J, K)`` uint8 of 0/1.

    The returned affine is ``like.affine`` (the mask's own agrees with it within
    ``AFFINE_ATOL_MM``/``AFFINE_RTOL``). Raises InputError for the file problems of
    :func:`load_image`, a shape or affine that differs from the image, values other than
    0 and 1 (e.g. 0/255 masks: binarise them first) and, if ``require_lesion``, an empty mask.
    """
    volume = read_volume(path)
    path, data = volume.path, volume.data
    check_same_grid(volume, like)
    is_binary = (data == 0) | (data == 1)
    if not is_binary.all():
        found = np.unique(data[~is_binary])
        shown = ", ".join(f"{v:g}" for v in found[:5]) + (", ..." if found.size > 5 else "")
        raise InputError(f"{path}: mask values must be 0 or 1, found {shown}")
    mask = data.astype(np.uint8)
    if require_lesion and not mask.any():
        raise InputError(f"{path}: mask is empty (no voxel is 1); every subject needs a lesion")
    return Volume(data=mask, affine=like.affine.copy(), path=path)


def to_bytes(data: np.ndarray, affine: np.ndarray, slope: float | None = None,
             inter: float | None = None) -> bytes:
    """A single-file NIfTI-1 (``.nii``) of ``data`` as bytes, deterministic.

    Args:
      data: ``(I, J, K)`` array; its dtype is the stored dtype (int16, uint8, float32...;
        bool is stored as uint8).
      affine: ``(4, 4)`` voxel -> world mm, written as both sform and qform (code 1).
      slope, inter: scl_slope/scl_inter (value = stored * slope + inter), as DICOM
        converters write int16 CT; None stores no scaling.
    """
    data = np.asarray(data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    header.set_data_shape(data.shape)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm")
    header.set_slope_inter(slope, inter)
    header["vox_offset"] = _NIFTI1_VOX_OFFSET
    pad = b"\x00" * (_NIFTI1_VOX_OFFSET - len(header.binaryblock))
    return header.binaryblock + pad + data.tobytes(order="F")


def save(path: str | Path, data: np.ndarray, affine: np.ndarray, *, slope: float | None = None,
         inter: float | None = None) -> None:
    """Write ``data`` (``(I, J, K)``, stored in its own dtype) as NIfTI, atomically.

    ``.nii.gz`` is gzip-compressed with a fixed header (mtime 0), so equal inputs give
    byte-identical files. ``slope``/``inter`` as in :func:`to_bytes`.
    """
    path = Path(path)
    raw = to_bytes(data, affine, slope, inter)
    if path.suffix == ".gz":
        raw = gzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0)
    with atomic_path(path) as tmp:
        tmp.write_bytes(raw)
