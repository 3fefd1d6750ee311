"""The report's reliability diagram: observed AVM frequency against predicted probability."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mlssp_jax import metrics

MARKERS = "osD^v"  # one per curve, so curves that coincide stay visible


def reliability_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], n_bins: int = 10,
                       title: str = "Reliability") -> Figure | None:
    """A reliability diagram of each named (labels (N,), probs (N,)) pair; None if no curve.

    Top: per equal-width bin, the mean predicted probability against the observed
    frequency (the diagonal is perfect calibration), ECE and Brier in the legend, which sits
    below the axes so it never covers a point. Bottom: the histogram of the probabilities.
    """
    if not curves:
        return None
    fig = Figure(figsize=(5.6, 6.6), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    for index, (name, (labels, probs)) in enumerate(curves.items()):
        bins = metrics.reliability_bins(labels, probs, n_bins)
        filled = bins["count"] > 0
        ece = metrics.expected_calibration_error(labels, probs, n_bins)
        brier = metrics.brier_score(labels, probs)
        line, = top.plot(bins["mean_prob"][filled], bins["frequency"][filled],
                         marker=MARKERS[index % len(MARKERS)], alpha=0.8,
                         label=f"{name} (n {len(labels)}, ECE {ece:.3f}, Brier {brier:.3f})")
        bottom.hist(probs, bins=n_bins, range=(0, 1), histtype="step", color=line.get_color())
    top.plot([0, 1], [0, 1], ls=":", color="grey", label="perfect calibration")
    top.set_ylabel("observed AVM frequency")
    top.set_xlim(0, 1)
    top.set_ylim(-0.02, 1.02)
    top.set_title(f"{title}\n({n_bins} equal-width bins, pooled out-of-fold)", fontsize=10)
    bottom.set_xlabel("predicted AVM probability")
    bottom.set_ylabel("subjects")
    fig.legend(*top.get_legend_handles_labels(), loc="outside lower center", fontsize=8,
               frameon=False)
    return fig


def figure_reliability(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path,
                       n_bins: int = 10) -> bool:
    """Save :func:`reliability_figure` of ``curves`` to ``path``; False (nothing written) if
    ``curves`` is empty."""
    fig = reliability_figure(curves, n_bins)
    if fig is None:
        return False
    fig.savefig(path, dpi=110)
    return True


__all__ = ["figure_reliability", "reliability_figure"]
