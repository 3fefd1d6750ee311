"""What ``predict`` writes per scan and per run (SPEC.md), each file atomically.

Per scan: ``O/<name>_mask.nii.gz`` (the input's shape and affine), ``O/<name>.json`` and
``O/<name>_overlay.png`` (and ``O/<name>_seg.dcm`` for a DICOM series, if asked for).
Per run: ``O/predictions.csv``, one row per scan in input order, written once at the end.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from mlssp_jax import measurements, nifti, overlay, scans
from mlssp_jax.fileio import inside, write_json, write_text

TABLE_COLUMNS = ("name", "image", "volume_ml", "abc2_ml", "avm_probability", "label",
                 "cnn_avm_probability", "descriptor_avm_probability", "folds", "seconds")


def write_scan(out: Path, path: Path, image: nifti.Volume, result: dict, info: dict,
               dicom_seg: bool = False) -> dict:
    """Write one scan's mask, JSON and overlay; return its ``predictions.csv`` row (no time).

    ``result`` is :func:`mlssp_jax.predict.predict_scan`'s; ``info`` the run's settings
    (``model``, ``folds``, ...), copied into the JSON. ``dicom_seg``: also write
    ``<name>_seg.dcm`` (:mod:`mlssp_jax.dicom_seg`) if the scan is a DICOM series.
    """
    name = scans.scan_name(path)
    abc = measurements.abc2(result["mask"], image.affine)
    abc2_ml = None if abc is None else round(abc.volume_ml, 4)
    inside(out, out / f"{name}_mask.nii.gz")  # the name comes from the scan's path
    nifti.save(out / f"{name}_mask.nii.gz", result["mask"], image.affine)
    record = {"image": str(path), **{k: v for k, v in result.items() if k != "mask"},
              "abc2_ml": abc2_ml, "voxels": int(result["mask"].sum()), **info}
    write_json(out / f"{name}.json", record)
    if dicom_seg and path.is_dir():
        from mlssp_jax import dicom_seg as seg  # highdicom: imported only when asked for

        seg.write_seg(out / f"{name}_seg.dcm", result["mask"], path)
    overlay.write_overlay(out / f"{name}_overlay.png", image.data, image.affine, result["mask"],
                          result, abc, name)
    return {"name": name, "image": str(path), "volume_ml": round(result["volume_ml"], 4),
            "abc2_ml": abc2_ml, "avm_probability": result["avm_probability"],
            "label": result["label"],
            "cnn_avm_probability": result.get("cnn_avm_probability"),
            "descriptor_avm_probability": result.get("descriptor_avm_probability"),
            "folds": ";".join(str(k) for k in info["folds"])}


def write_table(out: Path, rows: list[dict]) -> None:
    """``out/predictions.csv`` with ``TABLE_COLUMNS`` (empty cells for missing values)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in TABLE_COLUMNS})
    write_text(out / "predictions.csv", buffer.getvalue())
