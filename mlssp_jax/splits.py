"""Seeded stratified k-fold splits with an inner validation split, saved to the run's workdir.

Fold ``k`` tests on fold ``k`` and trains on the others; the inner validation subjects
(model selection) are drawn, stratified by label, from the training folds only, so the test
fold is never used for selection. Everything is a pure function of the ids, labels and seed
(the input order of the ids does not matter). :func:`load_or_create` writes
``W/splits.json`` once and reuses it, as nnU-Net's ``do_split`` does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlssp_jax.errors import InputError
from mlssp_jax.fileio import write_json

log = logging.getLogger(__name__)
SPLITS_FILE = "splits.json"


def _by_class(subject_ids: Sequence[str], labels: Sequence[int]) -> dict[int, list[str]]:
    """Sorted ids per label (sorted, so the input order never changes a split)."""
    if len(subject_ids) != len(labels):
        raise ValueError(f"{len(subject_ids)} subject ids but {len(labels)} labels")
    if len(set(subject_ids)) != len(subject_ids):
        raise InputError("subject ids: duplicates in the split")
    classes: dict[int, list[str]] = {}
    for sid, label in sorted(zip(subject_ids, labels, strict=True)):
        classes.setdefault(int(label), []).append(sid)
    return dict(sorted(classes.items()))


def make_folds(subject_ids: Sequence[str], labels: Sequence[int], num_folds: int,
               seed: int) -> list[list[str]]:
    """``num_folds`` disjoint folds (sorted id lists) covering all subjects, stratified by label.

    Each class is shuffled (seeded) and dealt round-robin, continuing where the previous
    class stopped, so fold sizes differ by at most one. Raises :class:`InputError` if a class
    has fewer subjects than folds.
    """
    rng = np.random.default_rng([seed, num_folds])
    folds: list[list[str]] = [[] for _ in range(num_folds)]
    dealt = 0
    for label, ids in _by_class(subject_ids, labels).items():
        if len(ids) < num_folds:
            raise InputError(f"labels: class {label} has {len(ids)} subjects, "
                             f"fewer than train.num_folds={num_folds}")
        for sid in rng.permutation(ids):
            folds[dealt % num_folds].append(str(sid))
            dealt += 1
    return [sorted(fold) for fold in folds]


def _inner_val(ids: list[str], labels: dict[str, int], fraction: float,
               rng: np.random.Generator) -> list[str]:
    """Stratified pick of ``round(fraction * n_class)`` ids per class, at least 1 where possible."""
    if fraction <= 0:
        return []
    picked: list[str] = []
    for label in sorted(set(labels[s] for s in ids)):
        members = sorted(s for s in ids if labels[s] == label)
        count = max(1, round(fraction * len(members))) if len(members) >= 2 else 0
        picked.extend(str(s) for s in rng.choice(members, size=count, replace=False))
    return sorted(picked)


def check_fold(fold: int, num_folds: int) -> None:
    """Raise InputError (naming ``--fold``) unless ``0 <= fold < num_folds``."""
    if not 0 <= fold < num_folds:
        raise InputError(f"--fold: must be in 0..{num_folds - 1}, got {fold}")


def fold_split(subject_ids: Sequence[str], labels: Sequence[int], fold: int, num_folds: int,
               inner_val_fraction: float, seed: int) -> dict[str, list[str]]:
    """``{"train", "val", "test"}`` id lists: test = fold ``fold``; val drawn from the rest."""
    check_fold(fold, num_folds)
    folds = make_folds(subject_ids, labels, num_folds, seed)
    label_of = {s: int(y) for s, y in zip(subject_ids, labels, strict=True)}
    pool = sorted(s for k, f in enumerate(folds) if k != fold for s in f)
    val = _inner_val(pool, label_of, inner_val_fraction, np.random.default_rng([seed, fold]))
    train = sorted(set(pool) - set(val))
    return {"train": train, "val": val, "test": folds[fold]}


def load_or_create(workdir: str | Path, subject_ids: Sequence[str], labels: Sequence[int],
                   num_folds: int, inner_val_fraction: float,
                   seed: int) -> list[dict[str, list[str]]]:
    """The per-fold splits of a run: read ``workdir/splits.json`` if present, else create it.

    Raises :class:`InputError` if the saved split was made for other subjects, labels or
    split parameters than given (a workdir belongs to one data set and one split).
    """
    path = Path(workdir) / SPLITS_FILE
    wanted = _wanted(subject_ids, labels, num_folds, inner_val_fraction, seed)
    saved = check_saved(workdir, subject_ids, labels, num_folds, inner_val_fraction, seed)
    if saved is not None:
        log.info("reusing the split in %s", path)
        return saved
    folds = [fold_split(subject_ids, labels, k, num_folds, inner_val_fraction, seed)
             for k in range(num_folds)]
    write_json(path, {**wanted, "folds": folds})
    log.info("wrote a %d-fold split of %d subjects to %s", num_folds, len(subject_ids), path)
    return folds


def _wanted(subject_ids: Sequence[str], labels: Sequence[int], num_folds: int,
            inner_val_fraction: float, seed: int) -> dict[str, Any]:
    subjects = dict(sorted((s, int(y)) for s, y in zip(subject_ids, labels, strict=True)))
    return {"seed": seed, "num_folds": num_folds, "inner_val_fraction": inner_val_fraction,
            "subjects": subjects}


def check_saved(workdir: str | Path, subject_ids: Sequence[str], labels: Sequence[int],
                num_folds: int, inner_val_fraction: float,
                seed: int) -> list[dict[str, list[str]]] | None:
    """The saved folds of ``workdir/splits.json`` (None if there is none); InputError if they
    were made for other subjects, labels or split parameters. Reads only: cheap, so a run
    checks it before any expensive work."""
    path = Path(workdir) / SPLITS_FILE
    if not path.exists():
        return None
    saved = _read(path)
    wanted = _wanted(subject_ids, labels, num_folds, inner_val_fraction, seed)
    for key, value in wanted.items():
        if saved.get(key) != value:
            raise InputError(f"{path}: saved split has a different '{key}' than this run's "
                             "data/config; use a new --workdir")
    return saved["folds"]


def _read(path: Path) -> dict[str, Any]:
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: unreadable split file: {err}") from None
    if not isinstance(saved, dict) or "folds" not in saved:
        raise InputError(f"{path}: not a split file (no 'folds')")
    return saved
