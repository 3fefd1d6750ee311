"""Adapter: the public PhysioNet CT-ICH dataset (Hssayeni et al., 82 scans) -> a manifest.

Layout read (``--root``): ``ct_scans/NNN.nii``, ``masks/NNN.nii`` and
``hemorrhage_diagnosis_raw_ct.csv`` with one row per slice (PatientNumber, SliceNumber,
Intraventricular, Intraparenchymal, Subarachnoid, Epidural, Subdural, No_Hemorrhage; other
columns such as Fracture_Yes_No are ignored).

The binary label is user-chosen: 1 if any slice of the scan shows one of the ``--positive``
subtypes, else 0. The dataset's masks are 0/255 (or 0/1); binarised copies (mask > 0, on
the scan's affine) are written beside the manifest in ``<manifest stem>_masks/``. Scans
whose mask is empty cannot train the lesion-centred pipeline: they are skipped, or with
``--keep-negative`` listed without a mask (usable where masks are not required).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from mlssp_jax import nifti
from mlssp_jax.cli import ArgumentParser, run_command, setup_logging
from mlssp_jax.errors import InputError
from mlssp_jax.fileio import atomic_dir, atomic_path
from mlssp_jax.manifest import COLUMNS

log = logging.getLogger(__name__)

SUBTYPES = ("Intraventricular", "Intraparenchymal", "Subarachnoid", "Epidural", "Subdural")
DIAGNOSIS_CSV = "hemorrhage_diagnosis_raw_ct.csv"


def parse_positive(text: str) -> tuple[str, ...]:
    """``"Intraparenchymal,Subarachnoid"`` -> the subtype names (case-insensitive), checked."""
    by_lower = {name.lower(): name for name in SUBTYPES}
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name.lower() not in by_lower]
    if not names or unknown:
        raise InputError(f"--positive: unknown subtype {', '.join(unknown) or repr(text)} "
                         f"(choose from {', '.join(SUBTYPES)})")
    return tuple(by_lower[name.lower()] for name in names)


def read_diagnosis(path: Path) -> dict[int, set[str]]:
    """Patient number -> the subtypes seen on any of its slices (empty set: none)."""
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected the PhysioNet CT-ICH diagnosis CSV)")
    reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"), newline=""))
    header = [name.strip() for name in reader.fieldnames or []]
    missing = [c for c in ("PatientNumber", "SliceNumber", *SUBTYPES) if c not in header]
    if missing:
        raise InputError(f"{path}: missing columns {', '.join(missing)}")
    reader.fieldnames = header
    seen: dict[int, set[str]] = defaultdict(set)
    for row in reader:
        try:
            patient = int(row["PatientNumber"])
            flags = {name for name in SUBTYPES if int(float(row[name] or 0)) == 1}
        except (TypeError, ValueError):
            raise InputError(f"{path}: line {reader.line_num}: PatientNumber and subtype "
                             "columns must be numbers") from None
        seen[patient] |= flags
    if not seen:
        raise InputError(f"{path}: no rows")
    return dict(seen)


def find_scan(folder: Path, patient: int) -> Path:
    """``folder/NNN.nii`` (or ``N.nii``, ``.nii.gz``) of a patient; InputError if absent."""
    for stem in (f"{patient:03d}", str(patient)):
        for suffix in (".nii", ".nii.gz"):
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    raise InputError(f"{folder / f'{patient:03d}.nii'}: no such file (patient {patient} "
                     "is in the diagnosis CSV)")


def _binary_mask(root: Path, patient: int) -> tuple[Path, nifti.Volume, np.ndarray]:
    """A patient's scan path, its image, and its mask binarised (> 0) as uint8, checked."""
    image_path = find_scan(root / "ct_scans", patient)
    image = nifti.load_image(image_path)
    raw = nifti.read_volume(find_scan(root / "masks", patient))
    nifti.check_same_grid(raw, image)
    return image_path, image, (raw.data > 0).astype(np.uint8)


def _rows(root: Path, diagnosis: dict[int, set[str]], positive: tuple[str, ...],
          mask_dir: Path, keep_negative: bool) -> list[tuple[str, Path, str | None, int]]:
    """Manifest rows ``(subject_id, image, mask name or None, label)``; masks to ``mask_dir``."""
    rows = []
    for patient in sorted(diagnosis):
        image_path, image, binary = _binary_mask(root, patient)
        subject_id = f"{patient:03d}"
        mask_name = f"{subject_id}.nii.gz"
        if binary.any():
            nifti.save(mask_dir / mask_name, binary, image.affine)
        elif keep_negative:
            mask_name = None
        else:
            log.info("patient %d: empty mask, skipped", patient)
            continue
        label = int(bool(diagnosis[patient] & set(positive)))
        rows.append((subject_id, image_path, mask_name, label))
    return rows


def build_manifest(root: str | Path, out: str | Path, positive: tuple[str, ...],
                   keep_negative: bool = False) -> Path:
    """Write the manifest ``out`` (and ``<stem>_masks/``) for a CT-ICH copy at ``root``.

    Image paths in the manifest are relative to its folder. Returns ``out``.
    """
    root, out = Path(root), Path(out)
    diagnosis = read_diagnosis(root / DIAGNOSIS_CSV)
    mask_dir = out.parent / f"{out.name.split('.')[0]}_masks"
    with atomic_dir(mask_dir) as tmp:
        rows = _rows(root, diagnosis, positive, tmp, keep_negative)
        if not rows:
            raise InputError(f"{root}: no scan has a hemorrhage mask")
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    for sid, image, mask_name, label in rows:
        mask = os.path.relpath(mask_dir / mask_name, out.parent) if mask_name else ""
        writer.writerow([sid, os.path.relpath(image.resolve(), out.parent.resolve()), mask, label])
    with atomic_path(out) as tmp:
        tmp.write_text(text.getvalue())
    n_pos = sum(row[3] for row in rows)
    log.info("wrote %s: %d scans, %d positive (%s)", out, len(rows), n_pos, "+".join(positive))
    return out


def main(argv=None) -> int:
    """``python -m mlssp_jax.physionet --root DIR --out MANIFEST --positive A[,B...]``."""
    parser = ArgumentParser(prog="python -m mlssp_jax.physionet",
                            description="Make a manifest from the PhysioNet CT-ICH dataset.")
    parser.add_argument("--root", required=True, type=Path, help="the dataset's folder")
    parser.add_argument("--out", required=True, type=Path, help="manifest CSV to write")
    parser.add_argument("--positive", required=True,
                        help=f"label-1 subtypes, comma-separated, from {', '.join(SUBTYPES)}")
    parser.add_argument("--keep-negative", action="store_true",
                        help="list scans with an empty mask (without a mask) instead of skipping")
    args = parser.parse_args(argv)
    positive = parse_positive(args.positive)
    if not args.root.is_dir():
        raise InputError(f"{args.root}: no such folder")
    setup_logging()
    build_manifest(args.root, args.out, positive, args.keep_negative)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
