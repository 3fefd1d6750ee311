"""Post-processing of a whole-scan mask, chosen on the inner validation set (nnU-Net's idea).

A rule is a small dict: ``{"name": "none"}``, ``{"name": "largest"}`` (keep the largest
26-connected component) or ``{"name": "min_ml", "min_ml": v}`` (drop components under ``v``
mL), with two optional keys: ``"threshold"`` (the probability a voxel must reach; absent:
the config's ``train.threshold``) and ``"max_hu"`` (voxels denser than this many HU are never
hemorrhage: bone or calcification left inside the brain mask; acute blood is 50-100 HU).
Every rule first restricts the mask to the brain. Training chooses the rule with the best mean
whole-scan DSC on the inner validation subjects (ties: the earlier, simpler rule), or with
``train.postprocess_select = "volume"`` that rule's components at the threshold of least
biased volumes (:func:`choose_scored`), and saves it as ``W/fold_K/postprocessing.json``; the
held-out evaluation and ``predict`` apply it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
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


def candidates(min_ml: Sequence[float], thresholds: Sequence[float] = (),
               max_hu: float | None = None) -> list[dict]:
    """The rules to choose from, simplest first: none, largest, then each ``min_ml`` (mL);
    each at every probability in ``thresholds`` in the order given (none given: no
    ``threshold`` key, the config's applies). ``max_hu`` (if given) is added to every rule."""
    base = [dict(NONE), {"name": "largest"}] + [{"name": "min_ml", "min_ml": float(v)}
                                                 for v in sorted(min_ml)]
    extra = {} if max_hu is None else {"max_hu": float(max_hu)}
    if not thresholds:
        return [{**rule, **extra} for rule in base]
    return [{**rule, "threshold": float(t), **extra} for t in thresholds for rule in base]


def describe(rule: dict) -> str:
    """A rule in a few characters for the log, e.g. ``min_ml2.0@0.6``."""
    text = f"{rule['name']}{rule.get('min_ml', '')}"
    return f"{text}@{rule['threshold']:g}" if "threshold" in rule else text


def threshold_of(rule: dict, default: float) -> float:
    """The probability threshold of ``rule`` (``default``, the config's, if it has none)."""
    return float(rule.get("threshold", default))


def restrict(mask: np.ndarray, brain: np.ndarray, rule: dict,
             hu: np.ndarray | None = None) -> np.ndarray:
    """``mask`` (bool, (D, H, W)) inside ``brain`` and, for a rule with ``max_hu``, where
    ``hu`` (the scan's HU on the same grid) is at most that."""
    mask = np.asarray(mask, bool) & np.asarray(brain, bool)
    if "max_hu" in rule:
        if hu is None:
            raise ValueError(f"post-processing rule {rule} needs the scan's HU")
        mask &= np.asarray(hu) <= rule["max_hu"]  # float16 HU compared as is (no copy)
    return mask


def label(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 26-connected components of ``mask``: labels (D, H, W) int (0: background) and
    the voxel count of each component, ``sizes[j]`` for label ``j + 1``."""
    labels, count = ndimage.label(mask, structure=_CONNECTIVITY)
    return labels, np.bincount(labels.ravel(), minlength=count + 1)[1:]


def kept_components(sizes: np.ndarray, rule: dict, voxel_ml: float) -> np.ndarray:
    """Which components (bool per entry of ``sizes``, voxels each) ``rule`` keeps."""
    sizes = np.asarray(sizes)
    if rule["name"] == "none":
        return np.ones(sizes.shape, bool)
    if rule["name"] == "largest":
        keep = np.zeros(sizes.shape, bool)
        if sizes.size:
            keep[int(np.argmax(sizes))] = True
        return keep
    if rule["name"] == "min_ml":
        return sizes * voxel_ml >= rule["min_ml"]
    raise ValueError(f"unknown post-processing rule {rule!r}")


def apply(mask: np.ndarray, brain: np.ndarray, rule: dict, voxel_ml: float,
          hu: np.ndarray | None = None) -> np.ndarray:
    """The mask (bool, (D, H, W)) after ``rule``, inside ``brain``; ``voxel_ml`` one voxel's mL.

    ``hu`` (D, H, W) the scan's HU on the same grid, needed by a rule with ``max_hu``.
    """
    mask = restrict(mask, brain, rule, hu)
    if rule["name"] == "none" or not mask.any():
        return mask
    labels, sizes = label(mask)
    return np.concatenate([[False], kept_components(sizes, rule, voxel_ml)])[labels]


VOLUME_ERROR_KEYS = {"volume": "median_volume_error_ml",
                     "volume_native": "median_volume_error_native_ml"}  # by selection


def best_component(scored: Sequence[dict]) -> list[int]:
    """Indices of the candidates of ``scored`` that share the component rule (name and
    ``min_ml``, any threshold) of the best-scoring one (the first of equals)."""
    best = max(range(len(scored)), key=lambda i: (scored[i]["score"], -i))
    def component(rule: dict) -> dict:
        return {k: v for k, v in rule.items() if k != "threshold"}
    return [i for i in range(len(scored))
            if component(scored[i]["rule"]) == component(scored[best]["rule"])]


def choose_scored(scored: Sequence[dict], select: str) -> dict:
    """The rule chosen among ``scored`` (``rule``, ``score`` (mean DSC) and, for a volume
    selection, its :data:`VOLUME_ERROR_KEYS` entry), in candidate order.

    ``"dsc"``: the highest score (the first of equals). ``"volume"`` / ``"volume_native"``:
    the component rule of that best one (its name and ``min_ml``), then among its thresholds
    the one whose median signed volume error (on the preprocessed grid / on the scans' own
    grids) is closest to 0 mL (ties: the higher score, then the first).
    """
    if select == "dsc":
        best = max(range(len(scored)), key=lambda i: (scored[i]["score"], -i))
        return scored[best]["rule"]
    if select not in VOLUME_ERROR_KEYS:
        raise ValueError(f"unknown post-processing selection {select!r}")
    key = VOLUME_ERROR_KEYS[select]
    chosen = min(best_component(scored), key=lambda i: (abs(scored[i][key]),
                                                        -scored[i]["score"], i))
    return scored[chosen]["rule"]


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


def ensemble_rule(workdir: Path, folds: Sequence[int]) -> tuple[dict, list[float]]:
    """The rule for an ensemble of ``folds`` and each fold's threshold.

    The rule is the one most folds chose (ties: the lowest fold's), without a threshold: the
    ensemble recentres each fold's probabilities on its own threshold
    (:func:`mlssp_jax.ensemble.logit_offset`) and applies the config's. A fold that chose no
    threshold has None.
    """
    rules = [load(rundir.fold_dir(workdir, k)) for k in folds]
    def key(rule: dict) -> str:
        return json.dumps({k: v for k, v in rule.items() if k != "threshold"}, sort_keys=True)
    counts = Counter(key(r) for r in rules)
    rule = {k: v for k, v in max(rules, key=lambda r: counts[key(r)]).items()
            if k != "threshold"}
    return rule, [r.get("threshold") for r in rules]
