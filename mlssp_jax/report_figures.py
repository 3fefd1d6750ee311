"""The report's PNG figures: Fig. 3-6 of the paper, the training curves and the reliability
diagram.

Each ``figure_*`` draws one figure from finished runs (:class:`mlssp_jax.report_tables.Run`),
or returns None if the runs lack what it needs; :func:`write_figures` saves them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mlssp_jax import metrics as metric_fns
from mlssp_jax import rundir
from mlssp_jax.calibration_figures import reliability_figure
from mlssp_jax.report_tables import (
    MODEL_TITLES,
    PAPER_SEG_KEYS,
    Run,
    calibration_curves,
    cls_block,
)
from mlssp_jax.rundir import VAL_SCORE

OVERLAY_SUBJECTS = 3
MASK_COLOURS = ListedColormap(["red"])  # Fig. 5: the mask's fill (the truth is a cyan outline)


def _with_task(by_model: dict[str, Run], task: str) -> list[Run]:
    """The runs whose model has ``task`` ("segmentation" or "classification")."""
    return [r for r in by_model.values() if r.summary[task]]


def _save(fig: Figure, path: Path) -> None:
    if fig.get_layout_engine() is None:  # a constrained layout is already laid out
        fig.tight_layout()
    fig.savefig(path, dpi=110)


def figure_per_subject(runs: Sequence[Run]) -> Figure | None:
    """Fig. 3: per-subject DSC, sensitivity, specificity and PPV of MLSSP, one box per alpha."""
    mlssp = sorted((r for r in runs if r.model == "mlssp" and r.summary["segmentation"]),
                   key=lambda r: str(r.alpha))
    if not mlssp:
        return None
    fig = Figure(figsize=(12, 3.4))
    axes = fig.subplots(1, len(PAPER_SEG_KEYS))
    rng = np.random.default_rng(0)  # jitter of the dots only
    for ax, key in zip(axes, PAPER_SEG_KEYS, strict=True):
        data = [[v for v in (row.get(key) for row in r.summary["segmentation"]["per_subject"])
                 if v is not None and np.isfinite(v)] for r in mlssp]
        ax.boxplot(data, showfliers=False)
        for x, values in enumerate(data, start=1):
            ax.scatter(x + rng.uniform(-0.15, 0.15, len(values)), values, s=8, alpha=0.5)
        ax.set_xticks(range(1, len(mlssp) + 1), [str(r.alpha) for r in mlssp])
        ax.set_xlabel("alpha")
        ax.set_title(key.upper() if key in ("dsc", "ppv") else key)
        ax.set_ylim(-0.02, 1.02)
    fig.suptitle("Per-subject segmentation metrics of MLSSP (pooled out-of-fold)")
    return fig


def figure_dsc_by_model(runs: Sequence[Run]) -> Figure:
    """Fig. 4: mean DSC (bootstrap 95% CI as error bars) of each (segmentation) run."""
    means = np.array([r.summary["segmentation"]["dsc"] for r in runs])
    cis = np.array([r.summary["segmentation"]["ci95"]["dsc"] for r in runs], dtype=float)
    errors = np.abs(np.stack([means - cis[:, 0], cis[:, 1] - means]))
    fig = Figure(figsize=(1.4 * len(runs) + 2, 3.6))
    ax = fig.subplots()
    ax.bar(range(len(runs)), means, yerr=np.nan_to_num(errors), capsize=4, color="tab:blue")
    ax.set_xticks(range(len(runs)), [MODEL_TITLES.get(r.model, r.model) for r in runs])
    for x, mean in enumerate(means):
        ax.text(x, mean / 2, f"{mean:.3f}", ha="center", color="white")
    ax.set_ylabel("mean DSC (95% CI)")
    ax.set_ylim(0, 1)
    ax.set_title("Mean DSC by model")
    return fig


def _roc_curve(ax, block: dict, label: str, **style) -> None:
    rows = block["per_subject"]
    fpr, tpr, _ = metric_fns.roc_curve(np.array([row["label"] for row in rows]),
                                       np.array([row["prob"] for row in rows]))
    auc, (low, high) = block["auc"], block["ci95"].get("auc") or (None, None)
    if auc is not None:
        label += f" (AUC {auc:.3f}" + (f" [{low:.2f}, {high:.2f}])" if low is not None else ")")
    ax.plot(fpr, tpr, drawstyle="steps-post", label=label, **style)


def figure_roc(runs: Sequence[Run]) -> Figure:
    """Fig. 6: ROC curves of the (classification) runs' pooled out-of-fold probabilities,
    AUC and its bootstrap 95% CI in the legend: the paper's VOI on the true lesion (left),
    the whole-scan pipeline (right; the descriptor classifiers dashed)."""
    whole = [r for r in runs if cls_block(r, "whole") or cls_block(r, "descriptors")]
    fig = Figure(figsize=(5.0 * (1 + bool(whole)), 6.5), layout="constrained")
    axes = fig.subplots(1, 1 + bool(whole), squeeze=False)[0]
    for index, run in enumerate(runs):
        if cls_block(run, "voi"):
            _roc_curve(axes[0], cls_block(run, "voi"), MODEL_TITLES.get(run.model, run.model),
                       color=f"C{index}")
    axes[0].set_title("ROC, VOI on the true lesion (the paper's protocol)\n"
                      "pooled out-of-fold; AUC [95% bootstrap CI]", fontsize=9)
    if whole:
        for index, run in enumerate(runs):
            title = MODEL_TITLES.get(run.model, run.model)
            if cls_block(run, "whole"):
                _roc_curve(axes[1], cls_block(run, "whole"), title, color=f"C{index}")
            if cls_block(run, "descriptors"):
                _roc_curve(axes[1], cls_block(run, "descriptors"), f"descriptors, {title}'s lesion",
                           color=f"C{index}", ls="--")
        axes[1].set_title("ROC, whole scan (the pipeline's own lesion)\n"
                          "pooled out-of-fold; AUC [95% bootstrap CI]", fontsize=9)
    for ax in axes:
        ax.plot([0, 1], [0, 1], ls=":", color="grey")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        # under the panel: a chance-level curve crosses the lower right, where legends sit
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=7)
    return fig


def figure_calibration(by_model: dict[str, Run]) -> Figure | None:
    """The reliability diagram of MLSSP's run (else the first classifying run): its CNN by
    both protocols and the descriptor classifier on its predicted lesion."""
    runs = [by_model["mlssp"]] if "mlssp" in by_model else list(by_model.values())
    for run in runs:
        curves = calibration_curves(run)
        if curves:
            block = cls_block(run, "voi") or cls_block(run, "whole")
            bins = (block or {}).get("calibration_bins", 10)
            return reliability_figure(curves, bins, f"Reliability of {run.title}")
    return None


def panel_titles(runs: Sequence[Run]) -> list[str]:
    """Each run's title (model and alpha), with its directory's name where two runs share
    one (e.g. one model trained on two cohorts)."""
    counts = Counter(run.title for run in runs)
    return [f"{run.title}: {run.workdir.name}" if counts[run.title] > 1 else run.title
            for run in runs]


def figure_training_curves(runs: Sequence[Run]) -> Figure | None:
    """Training loss (solid, left axis) and inner-validation score (dashed, right axis) per
    epoch, one panel per run, one colour per fold."""
    logs = [(run, rundir.metrics_files(run.workdir)) for run in runs]
    logs = [(run, files) for run, files in logs if files]
    if not logs:
        return None
    cols = min(3, len(logs))
    rows = -(-len(logs) // cols)
    fig = Figure(figsize=(4.4 * cols, 3.0 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    folds: dict[str, object] = {}  # fold name -> its line, for one legend under the panels
    titles = panel_titles([run for run, _ in logs])
    for ax, (_, files), title in zip(axes, logs, titles, strict=False):
        score_ax = ax.twinx()
        for index, file in enumerate(files):
            records = rundir.read_jsonl(file)
            epochs = [r["epoch"] for r in records]
            (line,) = ax.plot(epochs, [r.get("train_loss") for r in records],
                              color=f"C{index}")
            folds.setdefault(file.parent.name, line)
            score_ax.plot(epochs, [r.get(VAL_SCORE) for r in records], color=f"C{index}",
                          ls="--")
        score_ax.set_ylim(0, 1)
        score_ax.set_ylabel("inner-val score", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("train loss")
    for ax in axes[len(logs):]:
        ax.set_visible(False)
    fig.legend(list(folds.values()), list(folds), loc="outside lower center",
               ncol=len(folds), fontsize=7)  # outside the panels: no curve is covered
    fig.suptitle("Training curves\n(solid: train loss; dashed: inner-validation score)",
                 fontsize=9)
    return fig



def _axial(volume: np.ndarray, k: int) -> np.ndarray:
    """Axial slice k of a (D, H, W[, 1]) RAS volume, transposed for imshow (origin lower)."""
    return np.asarray(volume).reshape(volume.shape[:3])[:, :, k].T


def figure_overlays(runs: Sequence[Run], count: int = OVERLAY_SUBJECTS) -> Figure | None:
    """Fig. 5: axial slices through the lesion: ground truth, then each model's mask.

    Subjects are spread evenly over the ids that every (segmentation) run has predicted.
    """
    files = [rundir.prediction_files(r.workdir) for r in runs]
    common = sorted(set.intersection(*(set(f) for f in files))) if files else []
    if not common:
        return None
    spread = np.linspace(0, len(common) - 1, min(count, len(common))).astype(int)
    chosen = [common[i] for i in spread]
    fig = Figure(figsize=(2.3 * (1 + len(runs)), 2.5 * len(chosen)))
    axes = fig.subplots(len(chosen), 1 + len(runs), squeeze=False)
    for row, subject in zip(axes, chosen, strict=True):
        with np.load(files[0][subject]) as first:
            image, truth = first["image"], first["mask"]
        k = int(np.argmax(truth.reshape(truth.shape[:3]).sum(axis=(0, 1))))
        preds = []
        for run, f in zip(runs, files, strict=True):
            with np.load(f[subject]) as data:
                preds.append((MODEL_TITLES.get(run.model, run.model), data["pred"]))
        truth_slice = _axial(truth, k)
        for ax, (title, mask) in zip(row, [("ground truth", truth)] + preds, strict=True):
            ax.imshow(_axial(image, k), cmap="gray", origin="lower", vmin=0, vmax=1)
            m = _axial(mask, k)
            ax.imshow(np.ma.masked_where(m == 0, m), cmap=MASK_COLOURS, alpha=0.45,
                      origin="lower", vmin=0, vmax=1)
            if truth_slice.any():
                ax.contour(truth_slice, levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"{subject}\naxial slice {k}", fontsize=8)
    fig.suptitle("Axial slice through the lesion:\nmask filled, ground truth outlined "
                 "(neurological convention)", fontsize=9)
    return fig


FIGURES = (("fig3_per_subject.png", "Fig. 3: per-subject segmentation metrics of MLSSP by alpha"),
           ("fig4_dsc_by_model.png", "Fig. 4: mean DSC by model"),
           ("fig5_overlays.png", "Fig. 5: segmentation overlays (ground truth and each model)"),
           ("fig6_roc_by_model.png", "Fig. 6: ROC curves by model"),
           ("training_curves.png", "Training curves"),
           ("reliability.png", "Reliability diagram (calibration)"))


def write_figures(runs: Sequence[Run], by_model: dict[str, Run], out: Path) -> list[str]:
    """Draw every figure that the runs allow into ``out``; return the file names written."""
    seg = _with_task(by_model, "segmentation")
    cls = [r for r in by_model.values()  # any classification: the VOI's, the whole scan's
           if any(cls_block(r, protocol) for protocol in ("voi", "whole", "descriptors"))]
    drawn = {FIGURES[0][0]: figure_per_subject(runs),
             FIGURES[1][0]: figure_dsc_by_model(seg) if seg else None,
             FIGURES[2][0]: figure_overlays(seg),
             FIGURES[3][0]: figure_roc(cls) if cls else None,
             FIGURES[4][0]: figure_training_curves(runs),
             FIGURES[5][0]: figure_calibration(by_model)}
    for name, fig in drawn.items():
        if fig is not None:
            _save(fig, out / name)
    return [name for name, fig in drawn.items() if fig is not None]
