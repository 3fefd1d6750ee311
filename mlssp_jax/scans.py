"""The one way every command reads a CT scan: a NIfTI file or a DICOM series folder.

A path names a scan if it is a ``.nii``/``.nii.gz`` file, or a folder holding DICOM files and
no NIfTI file (read by :mod:`mlssp_jax.dicom` as one series). A folder holding NIfTI files
stands for those files (``predict --image DIR``); NIfTI files win over DICOM files in the same
folder, so a folder is never both. A scan's name (output files) is the file name without
``.nii``/``.nii.gz``, or the series folder's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mlssp_jax import dicom, nifti
from mlssp_jax.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def nifti_files(folder: Path) -> list[Path]:
    """The NIfTI files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p))


def is_series_folder(path: Path) -> bool:
    """Whether ``path`` is a folder read as one DICOM series (DICOM files, no NIfTI file)."""
    return path.is_dir() and not nifti_files(path) and dicom.holds_dicom(path)


def load_scan(path: str | Path) -> nifti.Volume:
    """A CT scan as float32 HU and its affine (RAS+ mm): a NIfTI file or a DICOM series folder.

    Raises InputError naming the path for anything :func:`nifti.load_image` or
    :func:`dicom.read_series` refuses, and for a folder that holds neither kind of scan.
    """
    path = Path(path)
    if path.is_dir():
        if not is_series_folder(path):
            raise InputError(f"{path}: a folder given as one scan must hold a DICOM series "
                             "(and no NIfTI file)")
        return nifti.check_image(dicom.read_series(path))
    if path.exists() and not is_nifti(path):
        raise InputError(f"{path}: not a NIfTI file (.nii or .nii.gz) or DICOM series folder")
    return nifti.load_image(path)


def scan_paths(items: Sequence[Path]) -> list[Path]:
    """The scans named on a command line, in order.

    A NIfTI file is a scan; a folder of NIfTI files stands for those files (sorted); any
    other folder holding DICOM files is one series, its headers checked here
    (:func:`dicom.check_series`: nothing is written before a bad series is found). Raises
    InputError for a missing path, another kind of file, a folder holding neither NIfTI nor
    DICOM files, a bad series, and two scans with one output name (:func:`scan_name`).
    """
    paths = []
    for item in items:
        if item.is_dir():
            found = nifti_files(item)
            if found:
                paths += found
            elif dicom.holds_dicom(item):
                dicom.check_series(item)
                paths.append(item)
            else:
                raise InputError(f"{item}: no .nii or .nii.gz file and no DICOM file in the "
                                 "folder")
        elif not item.is_file():
            raise InputError(f"{item}: no such file or directory")
        elif not is_nifti(item):
            raise InputError(f"{item}: not a NIfTI file (.nii or .nii.gz) or DICOM series "
                             "folder")
        else:
            paths.append(item)
    _check_unique_names(paths)
    return paths


def _check_unique_names(paths: list[Path]) -> None:
    """InputError if two scans would write the same output files."""
    seen: dict[str, Path] = {}
    for path in paths:
        name = scan_name(path)
        if name in seen:
            raise InputError(f"{path}: same output name '{name}' as {seen[name]}; rename one")
        seen[name] = path


def scan_name(path: Path) -> str:
    """The file name without .nii / .nii.gz, or the series folder's name."""
    if path.is_dir():
        return path.resolve().name
    return path.name.removesuffix(".gz").removesuffix(".nii")
