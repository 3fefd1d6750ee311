"""Post-processing of a whole-scan mask, chosen on the inner validation set (nnU-Net's idea).

A rule is a small dict: ``{"name": "none"}``, ``{"name": "largest"}`` (keep the largest
26-connected component) or ``{"name": "min_ml", "min_ml": v}`` (drop components under ``v``
mL). Every rule first restricts the mask to the brain. Training chooses the rule with the
best mean whole-scan DSC on the inner validation subjects (ties: the earlier, simpler rule)
and saves it as ``W/fold_K/postprocessing.json``; the held-out evaluation and ``predict``
apply it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from mlssp_jax import rundir
from mlssp_jax.errors import InputError
from mlssp_jax.fileio import write_json

log = logging.getLogger(__name__)
FILE_NAME = "postprocessing.json"
NONE = {"name": "none"}
_CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-connected components


def candidates(min_ml: Sequence[float]) -> list[dict]:
    """The rules to choose from, simplest first: none, largest, then each ``min_ml`` (mL)."""
    return [dict(NONE), {"name": "largest"}] + [{"name": "min_ml", "min_ml": float(v)}
                                                 for v in sorted(min_ml)]


def apply(mask: np.ndarray, brain: np.ndarray, rule: dict, voxel_ml: float) -> np.ndarray:
    """The mask (bool, (D, H, W)) after ``rule``, inside ``brain``; ``voxel_ml`` one voxel's mL."""
    mask = np.asarray(mask, bool) & np.asarray(brain, bool)
    if rule["name"] == "none" or not mask.any():
        return mask
    labels, count = ndimage.label(mask, structure=_CONNECTIVITY)
    sizes = np.bincount(labels.ravel())[1:]
    if rule["name"] == "largest":
        keep = np.zeros(count + 1, bool)
        keep[1 + int(np.argmax(sizes))] = True
    elif rule["name"] == "min_ml":
        keep = np.concatenate([[False], sizes * voxel_ml >= rule["min_ml"]])
    else:
        raise ValueError(f"unknown post-processing rule {rule!r}")
    return keep[labels]


def choose(score: Callable[[dict], float], rules: Sequence[dict]) -> tuple[dict, list[dict]]:
    """The rule of highest ``score(rule)`` (the first of equals) and every rule's score."""
    scored = [{"rule": rule, "score": float(score(rule))} for rule in rules]
    best = max(range(len(scored)), key=lambda i: (scored[i]["score"], -i))
    return scored[best]["rule"], scored


def save(fold_dir: Path, rule: dict, scored: list[dict]) -> None:
    """Write ``fold_dir/postprocessing.json``: the rule and the validation score of each."""
    write_json(Path(fold_dir) / FILE_NAME, {"rule": rule, "validation": scored})


def load(fold_dir: Path) -> dict:
    """The fold's saved rule; ``none`` for a run made before post-processing was chosen."""
    path = Path(fold_dir) / FILE_NAME
    if not path.is_file():
        return dict(NONE)
    try:
        return json.loads(path.read_text())["rule"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not a post-processing file: {err}") from None


def ensemble_rule(workdir: Path, folds: Sequence[int]) -> dict:
    """The rule for an ensemble of ``folds``: the one most folds chose (ties: lowest fold's)."""
    rules = [load(rundir.fold_dir(workdir, k)) for k in folds]
    counts = Counter(json.dumps(r, sort_keys=True) for r in rules)
    return max(rules, key=lambda r: counts[json.dumps(r, sort_keys=True)])
