"""Score ``predict``'s outputs against reference masks and labels, on each scan's own grid.

``python -m mlssp_jax.score --predictions O --data MANIFEST [--out FILE] [--bootstrap N]
[--seed S]``: for each manifest subject, ``predict``'s ``O/<name>_mask.nii.gz`` and
``O/<name>.json`` (``<name>`` as ``predict`` names it: the scan's file name without
``.nii``/``.nii.gz``, or its series folder's name) are compared with the subject's mask and
label. Per subject (``per_subject`` rows): ``dsc``, ``hd95_mm`` (None if a mask is empty),
``volume_ml`` and ``true_volume_ml`` (mL), ``volume_error_ml`` (absolute, as in eval.json) and
``signed_volume_error_ml`` (predicted minus true),
``false_positive_ml`` (mL predicted more than 10 mm from the lesion), ``detected``, and
``label`` and ``avm_probability``. Pooled (``segmentation``): mean DSC and HD95 with
percentile-bootstrap 95% CIs over subjects, median absolute, median signed and mean absolute
volume error, median false-positive volume, lesions found; (``classification``, if the manifest
has labels and ``predict`` gave probabilities): accuracy, sensitivity, specificity at
``avm_probability >= threshold`` (``predict``'s ``label``; the JSON's ``threshold``), AUC,
Brier and ECE with CIs, and the ECE a calibrated model would show
(:func:`mlssp_jax.metrics.ece_if_calibrated`). Written to ``FILE`` (default
``O/score.json``) atomically, and printed as a short table.

The same masks ``predict`` writes, scored as a user would score them: the held-out whole-scan
evaluation's scan-grid figures (``dsc_native``, ``volume_error_native_ml``) for scans no fold
trained on. Every file is checked before anything is written: a manifest subject without
predictions, a mask on another grid or with values other than 0/1, or a malformed JSON is an
``error:`` line and exit 2.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mlssp_jax import cli, evaluate, metrics, nifti, scans, wholescan
from mlssp_jax import manifest as manifest_lib
from mlssp_jax.errors import InputError
from mlssp_jax.fileio import write_json

log = logging.getLogger(__name__)

THRESHOLD = 0.5  # predict's label is avm_probability >= its JSON's threshold, this if absent
CALIBRATION_BINS = 10
DEFAULT_RESAMPLES = 2000


def prediction_files(predictions: Path, subject: manifest_lib.Subject) -> tuple[Path, Path]:
    """(mask, JSON) that ``predict`` wrote for ``subject``'s scan; InputError if missing."""
    name = scans.scan_name(subject.image)
    files = predictions / f"{name}_mask.nii.gz", predictions / f"{name}.json"
    for path in files:
        if not path.is_file():
            raise InputError(f"{path}: missing: no prediction for subject "
                             f"'{subject.subject_id}' ({subject.image}); run predict on it "
                             "or leave it out of the manifest")
    return files


def read_probability(path: Path) -> tuple[float | None, float]:
    """(``avm_probability``, ``threshold``) of one of predict's JSON files (probability None
    if it has none; threshold ``THRESHOLD`` if the file does not say)."""
    try:
        record = json.loads(path.read_text())
        value, threshold = record.get("avm_probability"), record.get("threshold", THRESHOLD)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise InputError(f"{path}: not predict's JSON ({err})") from None
    for key, number in (("avm_probability", value), ("threshold", threshold)):
        if number is not None and (isinstance(number, bool) or not isinstance(
                number, (int, float)) or not 0.0 <= number <= 1.0):
            raise InputError(f"{path}: {key} must be a number in [0, 1], got {number!r}")
    return (None if value is None else float(value)), float(threshold)


def subject_row(subject: manifest_lib.Subject, predictions: Path) -> dict:
    """One subject's metrics (see the module docstring), its prediction checked against its
    reference mask's grid."""
    mask_path, json_path = prediction_files(predictions, subject)
    truth = nifti.read_volume(subject.mask)
    reference = nifti.load_mask(subject.mask, truth, require_lesion=False).data.astype(bool)
    pred = nifti.load_mask(mask_path, truth, require_lesion=False).data.astype(bool)
    spacing = tuple(float(s) for s in truth.spacing_mm)
    seg = metrics.segmentation_metrics(pred, reference, spacing)
    volume, true_volume = (float(np.count_nonzero(m)) * truth.voxel_volume_ml
                           for m in (pred, reference))
    hd95 = seg["hd95_mm"]
    return {"subject_id": subject.subject_id, "dsc": seg["dsc"],
            "hd95_mm": hd95 if math.isfinite(hd95) else None,
            "volume_ml": volume, "true_volume_ml": true_volume,
            "volume_error_ml": abs(volume - true_volume),
            "signed_volume_error_ml": volume - true_volume,
            "false_positive_ml": wholescan.false_positive_ml(pred, reference, spacing),
            "detected": bool(np.any(pred & reference)), "label": subject.label,
            **dict(zip(("avm_probability", "threshold"), read_probability(json_path),
                       strict=True))}


def _ci(statistic, *arrays: np.ndarray, n_resamples: int, seed: int) -> list[float | None]:
    return evaluate.estimate_and_ci(statistic, *arrays, n_resamples=n_resamples, seed=seed)[1]


def pool_segmentation(rows: Sequence[dict], n_resamples: int, seed: int) -> dict:
    """Means (with CIs), medians and counts of the per-subject segmentation metrics."""
    dsc = np.array([r["dsc"] for r in rows])
    hd95 = np.array([r["hd95_mm"] for r in rows if r["hd95_mm"] is not None])
    errors = np.array([r["signed_volume_error_ml"] for r in rows])
    return {"dsc": float(dsc.mean()), "hd95_mm": float(hd95.mean()) if hd95.size else None,
            "median_abs_volume_error_ml": float(np.median(np.abs(errors))),
            "median_signed_volume_error_ml": float(np.median(errors)),
            "mean_abs_volume_error_ml": float(np.mean(np.abs(errors))),
            "median_false_positive_ml": float(np.median([r["false_positive_ml"] for r in rows])),
            "detected": int(sum(r["detected"] for r in rows)), "n_subjects": len(rows),
            "ci95": {"dsc": _ci(np.mean, dsc, n_resamples=n_resamples, seed=seed),
                     "hd95_mm": (_ci(np.mean, hd95, n_resamples=n_resamples, seed=seed)
                                 if hd95.size else [None, None]),
                     "median_abs_volume_error_ml": _ci(
                         lambda e: np.median(np.abs(e)), errors, n_resamples=n_resamples,
                         seed=seed)}}


def pool_classification(rows: Sequence[dict], n_resamples: int, seed: int) -> dict | None:
    """Classification metrics of the rows with a label and a probability (None if none), as
    ``summary.json`` pools them (:func:`mlssp_jax.evaluate.pool_classification`), at the one
    threshold the predictions were made with."""
    scored = [r for r in rows if r["label"] is not None and r["avm_probability"] is not None]
    if not scored:
        return None
    thresholds = {r["threshold"] for r in scored}
    if len(thresholds) > 1:
        raise InputError(f"the predictions were made with different thresholds "
                         f"{sorted(thresholds)}: score one run's predictions at a time")
    block = {"per_subject": [{"label": r["label"], "prob": r["avm_probability"]}
                             for r in scored]}
    pooled = evaluate.pool_classification([{"classification": block}], thresholds.pop(),
                                          n_resamples, seed, CALIBRATION_BINS)
    del pooled["per_subject"]  # the rows are the result's own per_subject
    return {**pooled, "n_subjects": len(scored)}


def score(predictions: Path, subjects: Sequence[manifest_lib.Subject], n_resamples: int,
          seed: int) -> dict:
    """The score of ``predictions`` for ``subjects`` (module docstring's layout)."""
    rows = [subject_row(subject, predictions) for subject in subjects]
    return {"predictions": str(predictions.resolve()),
            "segmentation": pool_segmentation(rows, n_resamples, seed),
            "classification": pool_classification(rows, n_resamples, seed),
            "bootstrap": {"resamples": n_resamples, "seed": seed, "confidence": 0.95},
            "per_subject": rows}


def summary_lines(result: dict) -> list[str]:
    """The printed summary: one line per task."""
    seg, cls = result["segmentation"], result["classification"]
    low, high = seg["ci95"]["dsc"]
    lines = [f"segmentation, {seg['n_subjects']} scans: DSC {seg['dsc']:.3f} [{low:.3f}, "
             f"{high:.3f}], median |volume error| {seg['median_abs_volume_error_ml']:.2f} mL "
             f"(signed {seg['median_signed_volume_error_ml']:+.2f}, mean "
             f"{seg['mean_abs_volume_error_ml']:.2f}), median false positive "
             f"{seg['median_false_positive_ml']:.2f} mL, found {seg['detected']}/"
             f"{seg['n_subjects']}"]
    if cls:
        lines.append(f"classification, {cls['n_subjects']} scans: AUC {_fmt(cls['auc'])}, "
                     f"accuracy {_fmt(cls['accuracy'])}, sensitivity "
                     f"{_fmt(cls['sensitivity'])}, specificity {_fmt(cls['specificity'])}, "
                     f"ECE {_fmt(cls['ece'])} (calibrated: "
                     f"{_fmt(cls['ece_if_calibrated']['median'])})")
    return lines


def _fmt(value: float | None) -> str:
    """A metric for the printed summary ("n/a" where undefined, e.g. one class only)."""
    return "n/a" if value is None else f"{value:.3f}"


def _finite(obj):
    """``obj`` with non-finite floats as None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m mlssp_jax.score", description=__doc__)
    parser.add_argument("--predictions", required=True, type=Path,
                        help="predict's output folder")
    parser.add_argument("--data", required=True, type=Path,
                        help="manifest CSV with each scan's reference mask (and label)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON to write (default: PREDICTIONS/score.json)")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES,
                        help="bootstrap resamples for the 95%% CIs")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = parser.parse_args(argv)
    cli.setup_logging()
    if args.bootstrap < 1:
        raise InputError(f"--bootstrap: must be >= 1, got {args.bootstrap}")
    if not args.predictions.is_dir():
        raise InputError(f"{args.predictions}: --predictions must be predict's output folder")
    out = args.out or args.predictions / "score.json"
    if out.is_dir() or not out.parent.is_dir():
        raise InputError(f"{out}: --out must be a JSON file in an existing folder")
    subjects = manifest_lib.read_manifest(args.data, require_masks=True, require_labels=False)
    result = _finite(score(args.predictions, subjects, args.bootstrap, args.seed))
    write_json(out, result)
    for line in summary_lines(result):
        print(line)
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run_command(main))
