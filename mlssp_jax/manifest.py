"""The data manifest (SPEC.md): a CSV ``subject_id,image,mask,label``, read and validated.

:func:`read_manifest` checks the table itself (header, ids, labels, that files exist);
:func:`check_subjects` opens every scan and mask (:mod:`mlssp_jax.nifti`'s checks);
:func:`check_folds` checks each class can fill the cross-validation folds.
``python -m mlssp_jax.manifest --check MANIFEST [--folds 5]`` runs all three.
"""

from __future__ import annotations

import csv
import io
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mlssp_jax import scans, verify
from mlssp_jax.cli import ArgumentParser, run_command, setup_logging
from mlssp_jax.errors import InputError
from mlssp_jax.fileio import safe_name_problem

log = logging.getLogger(__name__)

COLUMNS = ("subject_id", "image", "mask", "label")  # the header; synth and physionet write it
CLASS_NAMES = {0: "other", 1: "AVM"}


@dataclass(frozen=True)
class Subject:
    """One manifest row. Paths are absolute; ``mask``/``label`` may be None if not required."""

    subject_id: str
    image: Path
    mask: Path | None
    label: int | None


def native_masks(subjects: Sequence[Subject]) -> dict[str, Path]:
    """``{subject_id: mask path}`` of the subjects with a mask: each lesion mask on its scan's
    own grid, for whole-scan metrics in the scan's own space."""
    return {s.subject_id: s.mask for s in subjects if s.mask is not None}


def _read_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` pairs of the CSV, after checking its header."""
    if not path.is_file():
        raise InputError(f"{path}: no such manifest file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the manifest ({err})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [name.strip() for name in (reader.fieldnames or [])]
    missing = [name for name in COLUMNS if name not in header]
    if missing:
        raise InputError(f"{path}: header must be '{','.join(COLUMNS)}', "
                         f"missing {', '.join(missing)}")
    reader.fieldnames = header
    rows = []
    for row in reader:
        if None in row or None in row.values():
            raise InputError(f"{path}: line {reader.line_num}: expected {len(header)} fields")
        rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items()}))
    if not rows:
        raise InputError(f"{path}: the manifest lists no subjects")
    return rows


def _file(path: Path, line: int, column: str, value: str, required: bool) -> Path | None:
    """The absolute path of a file column (relative to the manifest's folder), checked.

    ``image`` may name a folder (a DICOM series, see :mod:`mlssp_jax.scans`)."""
    if not value:
        if required:
            raise InputError(f"{path}: line {line}: {column} is empty")
        return None
    resolved = Path(value).expanduser()
    resolved = resolved if resolved.is_absolute() else path.parent / resolved
    if column == "image" and resolved.is_dir():
        if not scans.is_series_folder(resolved):
            raise InputError(f"{path}: line {line}: image folder {resolved} holds no DICOM "
                             "series (or holds NIfTI files: name the file)")
    elif not resolved.is_file():
        raise InputError(f"{path}: line {line}: {column} file {resolved} does not exist")
    return resolved.resolve()


def _label(path: Path, line: int, value: str, required: bool) -> int | None:
    if not value and not required:
        return None
    if value not in ("0", "1"):
        raise InputError(f"{path}: line {line}: label must be 0 or 1, got {value!r}")
    return int(value)


def read_manifest(path: str | Path, require_masks: bool = True, *,
                  require_labels: bool = True) -> list[Subject]:
    """Read and validate a manifest; the subjects in file order.

    Raises InputError (naming the manifest, line and problem) for a missing or unreadable
    file, a bad header, no rows, a row with the wrong number of fields, a duplicate subject
    id or one that is not a safe file name (:func:`mlssp_jax.fileio.safe_name_problem`), a
    label other than 0/1, and an image (or required mask) file that does not exist.
    Relative paths are relative to the manifest's folder. The NIfTI files themselves are
    checked by :func:`check_subjects`.
    """
    path = Path(path)
    subjects, seen = [], {}
    for line, row in _read_rows(path):
        sid = row["subject_id"]
        problem = safe_name_problem(sid)
        if problem:
            raise InputError(f"{path}: line {line}: subject_id {sid!r} {problem} (it names "
                             "output files)")
        if sid in seen:
            raise InputError(f"{path}: line {line}: duplicate subject_id '{sid}' "
                             f"(first on line {seen[sid]})")
        seen[sid] = line
        subjects.append(Subject(
            subject_id=sid,
            image=_file(path, line, "image", row["image"], required=True),
            mask=_file(path, line, "mask", row["mask"], required=require_masks),
            label=_label(path, line, row["label"], required=require_labels)))
    return subjects


def check_subjects(subjects: list[Subject]) -> None:
    """Every header, then every voxel (:func:`mlssp_jax.verify.verify_dataset`); raises
    InputError for the first bad file."""
    verify.verify_dataset(subjects)


def check_folds(subjects: list[Subject], num_folds: int, where: str = "manifest") -> None:
    """Raise InputError unless each class has at least ``num_folds`` subjects.

    ``where`` names the data source in the message (the manifest path).
    """
    if any(s.label is None for s in subjects):
        raise InputError(f"{where}: every subject needs a label for cross-validation")
    counts = Counter(s.label for s in subjects)
    for label, name in CLASS_NAMES.items():
        if counts[label] < num_folds:
            raise InputError(f"{where}: only {counts[label]} subjects with label {label} "
                             f"({name}); {num_folds}-fold cross-validation needs at least "
                             f"{num_folds} per class")


def main(argv=None) -> int:
    """``python -m mlssp_jax.manifest --check MANIFEST [--folds K] [--no-masks]``."""
    parser = ArgumentParser(prog="python -m mlssp_jax.manifest",
                            description="Validate a manifest and every file it names.")
    parser.add_argument("--check", required=True, type=Path, metavar="MANIFEST")
    parser.add_argument("--folds", type=int, default=None,
                        help="also check each class has at least this many subjects")
    parser.add_argument("--no-masks", action="store_true", help="masks are optional")
    args = parser.parse_args(argv)
    if args.folds is not None and args.folds < 2:
        raise InputError(f"--folds: must be >= 2, got {args.folds}")
    setup_logging()
    subjects = read_manifest(args.check, require_masks=not args.no_masks)
    check_subjects(subjects)
    if args.folds is not None:
        check_folds(subjects, args.folds, where=str(args.check))
    counts = Counter(s.label for s in subjects)
    sys.stdout.write(f"{args.check}: OK, {len(subjects)} subjects "
                     f"({counts[1]} AVM, {counts[0]} other)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
