"""The predicted mask as a DICOM Segmentation (highdicom) referencing its source CT series.

``predict --dicom-seg`` writes ``O/<name>_seg.dcm`` for each DICOM series input: one binary
segment "Hemorrhage" (SNOMED CT 50960005, automatic, algorithm ``mlssp_jax``), one frame per
source slice with lesion, each referencing its CT image, in the series' frame of reference.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from mlssp_jax import dicom
from mlssp_jax.fileio import atomic_path

SEG_SERIES_NUMBER = 9100
# Type 2 patient/study attributes highdicom copies from the source images: present but
# possibly empty in DICOM, though exports often omit them.
TYPE2_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                  "StudyTime", "ReferringPhysicianName", "AccessionNumber", "StudyID")


def _version() -> str:
    try:
        return metadata.version("mlssp-jax")
    except metadata.PackageNotFoundError:
        return "0"


def segment_description() -> hd.seg.SegmentDescription:
    algorithm = hd.AlgorithmIdentificationSequence(
        name="mlssp_jax", version=_version(), family=codes.cid7162.ArtificialIntelligence)
    return hd.seg.SegmentDescription(
        segment_number=1, segment_label="hemorrhage",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Hemorrhage,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)


def write_seg(path: str | Path, mask: np.ndarray, series_folder: str | Path) -> None:
    """Write ``mask`` (``(columns, rows, slices)`` 0/1, the grid :func:`dicom.read_series` gives
    for ``series_folder``) as a binary DICOM SEG, atomically."""
    sources = dicom.sorted_datasets(series_folder)
    for ds in sources:  # in memory only: the source files are not touched
        for keyword in TYPE2_KEYWORDS:
            if keyword not in ds:
                setattr(ds, keyword, "")
    frames = np.stack([mask[:, :, k].T for k in range(mask.shape[2])]).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description()], series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="mlssp_jax", manufacturer_model_name="mlssp_jax",
        software_versions=_version(), device_serial_number="0",
        series_description="mlssp_jax hemorrhage")
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
