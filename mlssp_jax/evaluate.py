"""Pool the finished folds of a run into ``W/summary.json`` (``python -m mlssp_jax.evaluate``).

Segmentation metrics are averaged over all subjects of all finished folds; classification
metrics are computed once on the pooled out-of-fold probabilities (as the paper reports its
80 subjects). Every metric gets a seeded bootstrap 95% confidence interval over subjects.
``summary.json`` has eval.json's layout (``segmentation``/``classification`` with the same
metric keys and ``per_subject`` lists) plus ``ci95`` per task, ``folds``, ``missing_folds``,
``n_subjects`` and the bootstrap settings. Each classification block also has the pooled
calibration, ``brier`` and ``ece`` (``train.calibration_bins`` bins), with CIs, and
``ece_if_calibrated`` (the ECE a calibrated model would show on as many subjects: ``median``,
``range95``, and ``p`` of the observed ECE against it). ``whole_scan``
pools eval.json's whole-scan blocks the same way (its segmentation also gives the medians of
``MEDIAN_KEYS`` and ``median_signed_volume_error_native_ml``, predicted minus true on the
scans' grids; ``descriptor_classification``, the descriptor classifier on the pipeline's own
lesion, is pooled as ``classification``); null if no fold has one.

``--descriptors`` first adds the descriptor classifier to the folds of a run trained without
it (:func:`mlssp_jax.descriptor_eval.add_to_run`: refits it per fold, predicts the held-out
whole scans again; minutes per fold), then pools.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mlssp_jax import cli, metrics, rundir, wholescan
from mlssp_jax.errors import InputError
from mlssp_jax.ops import cpu_env
from mlssp_jax.rundir import CLS_KEYS, SEG_KEYS

log = logging.getLogger(__name__)

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
# whole scan: the typical subject, not the mean
MEDIAN_KEYS = ("false_positive_ml", "volume_error_ml", "volume_error_native_ml")
DESCRIPTOR_BLOCK = "descriptor_classification"  # = descriptor_eval.BLOCK (imported on demand)


def _as_float(value) -> float:
    """A per-subject metric as float; null (undefined, e.g. PPV of an empty prediction) -> NaN."""
    return float("nan") if value is None else float(value)


def _defined_mean(values: np.ndarray) -> float:
    """Mean of the defined (non-NaN) values; NaN if none (a statistic for the bootstrap)."""
    return metrics.mean_metrics([{"v": v} for v in values])["v"]


def estimate_and_ci(statistic, *arrays: np.ndarray, n_resamples: int,
                     seed: int) -> tuple[float | None, list[float | None]]:
    """A statistic over subjects and its bootstrap 95% CI, as JSON (undefined -> null).

    An undefined estimate (e.g. the AUC of one class) has no interval.
    """
    if not np.isfinite(statistic(*arrays)):
        return None, [None, None]
    estimate, low, high = metrics.bootstrap_ci(statistic, *arrays, n_resamples=n_resamples,
                                               seed=seed)
    return estimate, [float(b) if np.isfinite(b) else None for b in (low, high)]


def pool_segmentation(evals: Sequence[dict], n_resamples: int, seed: int,
                      metric_keys: Sequence[str] = SEG_KEYS) -> dict | None:
    """Mean of each per-subject segmentation metric over all subjects, with bootstrap CIs.

    Undefined per-subject values (null/NaN) are left out of the mean. None if no fold has
    a segmentation result (a classification-only model).
    """
    rows = [row for e in evals if e.get("segmentation") for row in e["segmentation"]["per_subject"]]
    if not rows:
        return None
    # a run made before hd95_mm/volume_error_ml were recorded pools the metrics it has
    keys = [k for k in metric_keys if any(k in row for row in rows)]
    pooled, ci95 = {}, {}
    for key in keys:
        column = np.array([_as_float(row.get(key)) for row in rows])
        pooled[key], ci95[key] = estimate_and_ci(_defined_mean, column,
                                                  n_resamples=n_resamples, seed=seed)
    return {**pooled, "ci95": ci95, "per_subject": rows}


def pool_classification(evals: Sequence[dict], threshold: float, n_resamples: int,
                        seed: int, n_bins: int = 10, key: str = "classification") -> dict | None:
    """Accuracy, sensitivity, specificity and AUC of the pooled out-of-fold probabilities of
    each eval's ``key`` block, their ``brier`` and ``ece`` (``n_bins`` bins), and
    ``ece_if_calibrated`` (:func:`metrics.ece_if_calibrated`: the ECE these probabilities
    would have if calibrated, on this many subjects, and the observed one's p)."""
    rows = [row for e in evals if e.get(key) for row in e[key]["per_subject"]]
    if not rows:
        return None
    labels = np.array([int(row["label"]) for row in rows])
    probs = np.array([float(row["prob"]) for row in rows])
    statistics = {name: (lambda y, p, name=name: metrics.classification_metrics(
        y, p, threshold)[name]) for name in CLS_KEYS}
    statistics["brier"] = metrics.brier_score
    statistics["ece"] = lambda y, p: metrics.expected_calibration_error(y, p, n_bins)
    pooled, ci95 = {}, {}
    for name, statistic in statistics.items():
        pooled[name], ci95[name] = estimate_and_ci(statistic, labels, probs,
                                                    n_resamples=n_resamples, seed=seed)
    reference = metrics.ece_if_calibrated(labels, probs, n_bins, n_resamples, seed)
    return {**pooled, "threshold": threshold, "calibration_bins": n_bins,
            "ece_if_calibrated": reference, "ci95": ci95, "per_subject": rows}


def summarize(workdir: str | Path, n_resamples: int = DEFAULT_RESAMPLES,
              seed: int = DEFAULT_SEED) -> dict:
    """The pooled summary of a run directory (see the module docstring for its layout).

    Raises InputError if no fold has finished; logs a warning naming missing folds.
    """
    workdir = Path(workdir)
    cfg = rundir.read_config(workdir)
    evals, missing = rundir.read_evals(workdir, cfg.train.num_folds)
    if not evals:
        raise InputError(f"{workdir}: no finished fold (no fold_K/eval.json)")
    if missing:
        log.warning("%s: folds %s have no eval.json; pooling folds %s only",
                    workdir, missing, sorted(evals))
    ordered = [evals[k] for k in sorted(evals)]
    seg = pool_segmentation(ordered, n_resamples, seed)
    bins = cfg.train.calibration_bins
    cls = pool_classification(ordered, cfg.train.threshold, n_resamples, seed, bins)
    n_subjects = len((seg or cls)["per_subject"])
    return {"model": cfg.model.name, "alpha": cfg.train.alpha, "folds": sorted(evals),
            "missing_folds": missing, "n_subjects": n_subjects,
            "bootstrap": {"resamples": n_resamples, "seed": seed, "confidence": 0.95},
            "segmentation": seg, "classification": cls,
            "whole_scan": pool_whole_scan(ordered, cfg.train.threshold, n_resamples, seed, bins)}


def median_signed_error(per_subject: Sequence[dict]) -> float | None:
    """Median over subjects of predicted minus true mL on the scans' own grids (> 0: masks
    too large); None if no subject has both volumes (no native masks, or an older run)."""
    errors = [row["volume_native_ml"] - row["true_volume_native_ml"] for row in per_subject
              if row.get("volume_native_ml") is not None
              and row.get("true_volume_native_ml") is not None]
    return float(np.median(errors)) if errors else None


def pool_whole_scan(evals: Sequence[dict], threshold: float, n_resamples: int,
                    seed: int, n_bins: int = 10) -> dict | None:
    """eval.json's ``whole_scan`` blocks pooled as the VOI protocol's, plus ``median_<key>``
    for :data:`MEDIAN_KEYS` and ``descriptor_classification`` (None if no fold has it);
    None if no fold has a whole-scan block (a run made before it, or no segmentation)."""
    blocks = [e["whole_scan"] for e in evals if e.get("whole_scan")]
    if not blocks:
        return None
    seg = pool_segmentation(blocks, n_resamples, seed, wholescan.SEG_KEYS)
    if seg is not None:
        for key in MEDIAN_KEYS:
            values = [row[key] for row in seg["per_subject"] if row.get(key) is not None]
            seg[f"median_{key}"] = float(np.median(values)) if values else None
        seg["median_signed_volume_error_native_ml"] = median_signed_error(seg["per_subject"])
    return {"segmentation": seg,
            "classification": pool_classification(blocks, threshold, n_resamples, seed, n_bins),
            DESCRIPTOR_BLOCK: pool_classification(blocks, threshold, n_resamples, seed, n_bins,
                                                  DESCRIPTOR_BLOCK)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m mlssp_jax.evaluate", description=__doc__)
    parser.add_argument("--workdir", required=True, type=Path, help="the run directory")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES,
                        help="bootstrap resamples for the 95%% CIs")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="bootstrap seed")
    parser.add_argument("--descriptors", action="store_true",
                        help="first add the descriptor classifier to folds trained without it "
                             "(refits it, predicts the held-out whole scans again)")
    args = parser.parse_args(argv)
    cli.setup_logging()
    if args.bootstrap < 1:
        raise InputError(f"--bootstrap: must be >= 1, got {args.bootstrap}")
    if args.descriptors:
        from mlssp_jax import descriptor_eval  # the network and its data: only when asked for

        descriptor_eval.add_to_run(args.workdir)
    summary = summarize(args.workdir, args.bootstrap, args.seed)
    rundir.write_summary(args.workdir, summary)
    log.info("wrote %s (%d subjects, folds %s)", args.workdir / rundir.SUMMARY_FILE,
             summary["n_subjects"], summary["folds"])
    return 0


if __name__ == "__main__":
    cpu_env.prepare_process()  # glibc malloc tunables and XLA flags (--descriptors runs the net)
    raise SystemExit(cli.run_command(main))
