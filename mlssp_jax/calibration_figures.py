"""The report's reliability diagram: observed AVM frequency against predicted probability."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mlssp_jax import metrics


def figure_reliability(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path,
                       n_bins: int = 10) -> bool:
    """Save a reliability diagram of each named (labels (N,), probs (N,)) pair to ``path``.

    Top: per equal-width bin, the mean predicted probability against the observed
    frequency (dots sized by count, the diagonal is perfect calibration), ECE and Brier in
    the legend. Bottom: the histogram of the probabilities. Returns False (nothing written)
    if ``curves`` is empty.
    """
    if not curves:
        return False
    fig = Figure(figsize=(5.0, 6.0))
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    for name, (labels, probs) in curves.items():
        bins = metrics.reliability_bins(labels, probs, n_bins)
        filled = bins["count"] > 0
        ece = metrics.expected_calibration_error(labels, probs, n_bins)
        brier = metrics.brier_score(labels, probs)
        line, = top.plot(bins["mean_prob"][filled], bins["frequency"][filled], marker="o",
                         label=f"{name} (ECE {ece:.3f}, Brier {brier:.3f})")
        bottom.hist(probs, bins=n_bins, range=(0, 1), histtype="step", color=line.get_color())
    top.plot([0, 1], [0, 1], ls=":", color="grey")
    top.set_ylabel("observed AVM frequency")
    top.set_xlim(0, 1)
    top.set_ylim(-0.02, 1.02)
    top.set_title(f"Reliability ({n_bins} equal-width bins, pooled out-of-fold)")
    top.legend(loc="upper left", fontsize=8)
    bottom.set_xlabel("predicted AVM probability")
    bottom.set_ylabel("subjects")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


__all__ = ["figure_reliability"]
