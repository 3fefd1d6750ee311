"""Writing a volume as a DICOM CT series (pydicom), to test and demonstrate DICOM input.

``python -m mlssp_jax.dicom_export SCAN.nii.gz OUT_FOLDER [--shuffle]`` writes one
single-frame CT file per slice (the volume's third voxel axis): int16 stored values with
``RescaleSlope``/``RescaleIntercept``, ``ImagePositionPatient`` of each slice and one
``ImageOrientationPatient``, from the affine (RAS+ converted to DICOM's LPS). A sheared
affine (the slice step not along the normal) is written as it is: a gantry-tilted series.
File names are random-ordered with ``--shuffle`` (readers must sort by position).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from mlssp_jax import nifti
from mlssp_jax.cli import ArgumentParser, run_command, setup_logging
from mlssp_jax.errors import InputError
from mlssp_jax.fileio import atomic_dir

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _geometry(affine_ras: np.ndarray) -> tuple[np.ndarray, list[float], np.ndarray]:
    """``ImageOrientationPatient`` (6,), ``PixelSpacing`` [row, col] mm, LPS affine (4, 4)."""
    lps = LPS_TO_RAS @ affine_ras
    along_row, along_col = lps[:3, 0], lps[:3, 1]
    col_mm, row_mm = np.linalg.norm(along_row), np.linalg.norm(along_col)
    if abs(along_row @ along_col) > 1e-6 * col_mm * row_mm:
        raise InputError("the in-plane voxel axes are not orthogonal; not a DICOM slice grid")
    cosines = np.concatenate([along_row / col_mm, along_col / row_mm])
    return cosines, [float(row_mm), float(col_mm)], lps


def _slice_dataset(plane: np.ndarray, k: int, lps: np.ndarray, cosines: np.ndarray,
                   spacing: list[float], uids: dict[str, str], rescale: tuple[float, float]
                   ) -> Dataset:
    """One CT slice: ``plane`` is ``(columns, rows)`` int16 stored values."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName, ds.PatientID = "SYNTHETIC^HEAD", uids["patient"]
    ds.PatientBirthDate, ds.PatientSex, ds.StudyID, ds.AccessionNumber = "", "O", "1", ""
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20260101", "120000", ""
    ds.Manufacturer = "mlssp_jax synthetic"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = uids["description"], 1, k + 1
    ds.ImagePositionPatient = [round(float(v), 6) for v in (lps @ [0, 0, k, 1])[:3]]
    ds.ImageOrientationPatient = [round(float(v), 8) for v in cosines]
    ds.PixelSpacing = [round(v, 6) for v in spacing]
    ds.SliceThickness = round(float(abs(lps[:3, 2] @ np.cross(cosines[:3], cosines[3:]))), 6)
    ds.Rows, ds.Columns = plane.shape[1], plane.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(plane.T.astype("<i2")).tobytes()
    return ds


def write_series(data_hu: np.ndarray, affine_ras: np.ndarray, folder: str | Path, *,
                 slope: float = 1.0, intercept: float = -1024.0, shuffle_seed: int | None = None,
                 description: str = "synthetic head CT", series_uid: str | None = None) -> str:
    """Write ``data_hu`` (``(I, J, K)`` HU; slice k = ``data[:, :, k]``) as a CT series.

    Stored values are ``round((HU - intercept) / slope)`` as int16. The folder is written
    atomically; file names are ``slice_NNNN.dcm`` in slice order, or a random permutation of
    them if ``shuffle_seed`` is given. Returns the SeriesInstanceUID.
    """
    cosines, spacing, lps = _geometry(np.asarray(affine_ras, np.float64))
    stored = np.round((np.asarray(data_hu, np.float64) - intercept) / slope)
    if stored.min() < -32768 or stored.max() > 32767:
        raise InputError(f"values {data_hu.min()}..{data_hu.max()} do not fit int16 with slope "
                         f"{slope} and intercept {intercept}")
    uids = {"patient": "SYNTH", "study": generate_uid(), "frame": generate_uid(),
            "series": series_uid or generate_uid(), "description": description}
    n = stored.shape[2]
    names = np.arange(n) if shuffle_seed is None else np.random.default_rng(
        shuffle_seed).permutation(n)
    with atomic_dir(folder) as tmp:
        for k in range(n):
            ds = _slice_dataset(stored[:, :, k].astype(np.int16), k, lps, cosines, spacing, uids,
                                (slope, intercept))
            ds.save_as(tmp / f"slice_{names[k]:04d}.dcm", enforce_file_format=True)
    return uids["series"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m mlssp_jax.dicom_export",
                            description=__doc__.split("\n")[0])
    parser.add_argument("scan", type=Path, help="a NIfTI CT scan (HU)")
    parser.add_argument("out", type=Path, help="the series folder to write")
    parser.add_argument("--shuffle", action="store_true", help="random file name order")
    args = parser.parse_args(argv)
    setup_logging()
    image = nifti.load_image(args.scan)
    uid = write_series(image.data, image.affine, args.out, shuffle_seed=0 if args.shuffle else None)
    sys.stdout.write(f"{args.out}: {image.data.shape[2]} slices, series {uid}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
