"""Dataset integrity, checked before a command writes anything (nnU-Net's
``verify_dataset_integrity``).

Two levels, one home:

- :func:`check_headers`: every subject's files from their headers alone (cheap): a readable
  NIfTI, a 3-D shape, a finite non-singular affine, an uncompressed file that holds all its
  voxels, and a mask with the image's shape and affine.
- :func:`load_subject`: one subject's voxels, fully checked (no NaN/inf, mask values 0/1 and
  not empty): preprocessing calls it per subject before it writes that subject, and commits
  nothing until every subject passed (:func:`mlssp_jax.fileio.staged_outputs`).

:func:`verify_dataset` runs both over a whole manifest (``python -m mlssp_jax.manifest
--check``). Every check raises :class:`~mlssp_jax.errors.InputError` naming the file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from mlssp_jax import dicom, nifti, scans
from mlssp_jax.errors import InputError

log = logging.getLogger(__name__)


class Subject(Protocol):
    """What a check needs of a manifest row (:class:`mlssp_jax.manifest.Subject`; the
    manifest imports this module, not the other way round)."""

    image: Path
    mask: Path | None


def check_scan_header(path: Path) -> tuple[tuple[int, int, int], np.ndarray] | None:
    """A scan's headers: a NIfTI file's (its shape and affine), or a DICOM series folder's
    (every file's header; None: its grid is known only once the series is assembled)."""
    if Path(path).is_dir():
        dicom.check_series(path)
        return None
    return nifti.read_header(path)


def check_subject_headers(subject: Subject) -> None:
    """One subject's image (and mask) headers; the mask's grid against the image's."""
    grid = check_scan_header(subject.image)
    if subject.mask is None or grid is None:  # a series' mask grid: checked with its voxels
        return
    shape, affine = grid
    mask_shape, mask_affine = nifti.read_header(subject.mask)
    if mask_shape != shape:
        raise InputError(f"{subject.mask}: mask shape {mask_shape} does not match image "
                         f"{subject.image} shape {shape}")
    if not nifti.same_grid(mask_affine, affine):
        diff = float(abs(mask_affine - affine).max())
        raise InputError(f"{subject.mask}: mask affine differs from image {subject.image} "
                         f"affine (largest difference {diff:.4g})")


def check_headers(subjects: Sequence[Subject]) -> None:
    """:func:`check_subject_headers` for every subject, in manifest order."""
    for subject in subjects:
        check_subject_headers(subject)
    log.debug("headers of %d subjects checked", len(subjects))


def load_subject(subject: Subject) -> tuple[nifti.Volume, nifti.Volume | None]:
    """The subject's image (HU) and mask (None without one), every voxel checked."""
    image = scans.load_scan(subject.image)
    mask = None if subject.mask is None else nifti.load_mask(subject.mask, like=image)
    return image, mask


def check_scans(paths: Sequence[Path]) -> nifti.Volume | None:
    """Every scan's header, then every scan's voxels (3-D, finite HU): before any output.

    ``paths`` are NIfTI files or DICOM series folders (:func:`mlssp_jax.scans.scan_paths`).
    Returns the last scan's volume (a caller with one scan need not read it again)."""
    for path in paths:
        check_scan_header(path)
    volume = None
    for path in paths:
        volume = scans.load_scan(path)
    return volume


def verify_dataset(subjects: Sequence[Subject], read_data: bool = True) -> None:
    """Every header first (:func:`check_headers`), then, if ``read_data``, every voxel."""
    check_headers(subjects)
    if read_data:
        for subject in subjects:
            load_subject(subject)
