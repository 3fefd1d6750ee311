"""The paper's tables and figures from finished runs (``python -m mlssp_jax.report``).

``python -m mlssp_jax.report RUN_DIRS... --out R`` writes ``R/report.md`` (Table 1:
segmentation by alpha, Table 2: classification by alpha, Table 3: classification by model,
with bootstrap 95% CIs, DeLong p-values against MLSSP, and the paper's numbers beside ours)
and the PNG figures it links (Fig. 3-6 of the paper and the training curves). A run is
identified by its ``config.toml`` (model, alpha); its numbers come from ``summary.json``
(computed on the fly by :mod:`mlssp_jax.evaluate` if the file is missing).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mlssp_jax import cli, evaluate
from mlssp_jax import metrics as metric_fns
from mlssp_jax.errors import InputError
from mlssp_jax.fileio import atomic_dir

log = logging.getLogger(__name__)

PAPER = "Zhao et al. 2022 (80 Tiantan Hospital patients; other data, not comparable)"
# Table 1 of the paper: alpha -> DSC, sensitivity, specificity, PPV.
PAPER_SEG_BY_ALPHA = {0.3: (0.814, 0.814, 0.985, 0.826), 0.4: (0.828, 0.842, 0.985, 0.838),
                      0.5: (0.811, 0.829, 0.989, 0.801), 0.6: (0.792, 0.815, 0.984, 0.800),
                      0.7: (0.780, 0.796, 0.982, 0.798)}
# Table 2: alpha -> accuracy (fraction), sensitivity, specificity.
PAPER_CLS_BY_ALPHA = {0.3: (0.8875, 0.881, 0.895), 0.4: (0.9500, 0.905, 1.000),
                      0.5: (0.9250, 0.881, 0.974), 0.6: (0.9375, 0.905, 0.974),
                      0.7: (0.9000, 0.905, 0.895)}
# Table 3: model -> accuracy, sensitivity, specificity, AUC (only MLSSP's AUC is given).
PAPER_CLS_BY_MODEL = {"mlssp": (0.9500, 0.905, 1.000, 0.982), "ynet": (0.9375, 0.881, 1.000, None),
                      "he": (0.9375, 0.905, 0.974, None), "cnn": (0.9250, 0.881, 0.974, None)}
MODEL_TITLES = {"mlssp": "MLSSP", "ynet": "Y-Net", "he": "He et al.", "unet3d": "3D U-Net",
                "cnn": "CNN"}
SEG_KEYS = ("dsc", "sensitivity", "specificity", "ppv")
CLS_KEYS = ("accuracy", "sensitivity", "specificity")
VAL_SCORE = "val_score"  # metrics.jsonl: the inner-validation score selecting checkpoints
OVERLAY_SUBJECTS = 3
MASK_COLOURS = ListedColormap(["red"])  # Fig. 5: the mask's fill (the truth is a cyan outline)


@dataclass(frozen=True)
class Run:
    """One finished run: its directory, identity and pooled summary (evaluate's layout)."""

    workdir: Path
    model: str
    alpha: float | str
    summary: dict

    @property
    def title(self) -> str:
        return f"{MODEL_TITLES.get(self.model, self.model)} (alpha {self.alpha})"


def load_run(workdir: Path) -> Run:
    """Read a run's summary.json, or pool its folds now if it has none."""
    path = workdir / "summary.json"
    if path.is_file():
        try:
            summary = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{path}: not valid JSON: {err}") from None
    else:
        log.info("%s: no summary.json, pooling its folds now", workdir)
        summary = evaluate.summarize(workdir)
    cfg, _, _ = evaluate.read_run(workdir)
    return Run(workdir, cfg.model.name, cfg.train.alpha, summary)


def best_alpha(runs: Sequence[Run]) -> float | str | None:
    """The MLSSP alpha with the best mean of pooled DSC and accuracy (the paper's choice rule).

    As in the paper this selects on the cross-validated (held-out) results themselves, so the
    best row is optimistic. None if there is no MLSSP run.
    """
    scored = [(_score(run), run.alpha) for run in runs if run.model == "mlssp"]
    return max(scored, key=lambda item: item[0])[1] if scored else None


def _score(run: Run) -> float:
    seg, cls = run.summary["segmentation"], run.summary["classification"]
    parts = [seg["dsc"] if seg else None, cls["accuracy"] if cls else None]
    parts = [p for p in parts if p is not None]
    return float(np.mean(parts)) if parts else float("-inf")


def runs_by_model(runs: Sequence[Run], alpha: float | str | None) -> dict[str, Run]:
    """One run per model: the one at ``alpha`` if there is one, else its first run."""
    chosen: dict[str, Run] = {}
    for run in runs:
        current = chosen.get(run.model)
        if current is None or (current.alpha != alpha and run.alpha == alpha):
            chosen[run.model] = run
    order = list(MODEL_TITLES)
    return dict(sorted(chosen.items(), key=lambda kv: order.index(kv[0])
                       if kv[0] in order else len(order)))


def _cell(task: dict | None, key: str, percent: bool = False) -> str:
    """'value [low, high]' from a pooled task summary; '-' if absent."""
    if not task or task.get(key) is None:
        return "-"
    scale, digits = (100.0, 2) if percent else (1.0, 3)
    low, high = task["ci95"].get(key) or (None, None)
    text = f"{task[key] * scale:.{digits}f}"
    if low is not None and high is not None:
        text += f" [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"
    return text


def _paper(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"*{value * 100:.2f}*" if percent else f"*{value:.3f}*"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _median(task: dict | None, key: str) -> str:
    value = task and task.get(f"median_{key}")
    return "-" if value is None else f"{value:.2f}"


def table_protocols(runs: Sequence[Run]) -> list[str]:
    """Each run by both protocols, whole scan first: what a user gets on a new scan (sliding
    windows, the run's post-processing) beside the paper's VOI centred on the true lesion."""
    header = ["run", "model", "alpha", "whole DSC", "whole HD95 mm", "whole |vol err| mL "
              "(median)", "whole false positive mL (median)", "whole detected", "whole AUC",
              "VOI DSC", "VOI AUC"]
    rows = []
    for run in runs:
        whole = run.summary.get("whole_scan") or {}
        wseg, wcls = whole.get("segmentation"), whole.get("classification")
        rows.append([run.workdir.name, MODEL_TITLES.get(run.model, run.model), str(run.alpha),
                     _cell(wseg, "dsc"), _cell(wseg, "hd95_mm"),
                     f"{_cell(wseg, 'volume_error_ml')} ({_median(wseg, 'volume_error_ml')})",
                     f"{_cell(wseg, 'false_positive_ml')} ({_median(wseg, 'false_positive_ml')})",
                     _cell(wseg, "detected"), _cell(wcls, "auc"),
                     _cell(run.summary["segmentation"], "dsc"),
                     _cell(run.summary["classification"], "auc")])
    return _table(header, rows)


def table_segmentation_by_alpha(runs: Sequence[Run]) -> list[str]:
    """Table 1: MLSSP's pooled segmentation metrics by alpha, the paper's beside each."""
    header = ["alpha"] + [f"{name} {col}" for name in ("DSC", "Sens", "Spec", "PPV")
                          for col in ("(ours)", "(paper)")]
    rows = []
    for run in sorted((r for r in runs if r.model == "mlssp"), key=lambda r: str(r.alpha)):
        paper = PAPER_SEG_BY_ALPHA.get(run.alpha, (None,) * 4)
        seg = run.summary["segmentation"]
        rows.append([str(run.alpha)] + [c for key, ref in zip(SEG_KEYS, paper, strict=True)
                                        for c in (_cell(seg, key), _paper(ref))])
    return _table(header, rows)


def table_classification_by_alpha(runs: Sequence[Run]) -> list[str]:
    """Table 2: MLSSP's pooled classification by alpha (accuracy in %), the paper's beside."""
    header = ["alpha"] + [f"{name} {col}" for name in ("Acc %", "Sens", "Spec")
                          for col in ("(ours)", "(paper)")] + ["AUC (ours)"]
    rows = []
    for run in sorted((r for r in runs if r.model == "mlssp"), key=lambda r: str(r.alpha)):
        paper = PAPER_CLS_BY_ALPHA.get(run.alpha, (None,) * 3)
        cls = run.summary["classification"]
        cells = [c for key, ref in zip(CLS_KEYS, paper, strict=True)
                 for c in (_cell(cls, key, key == "accuracy"), _paper(ref, key == "accuracy"))]
        rows.append([str(run.alpha)] + cells + [_cell(cls, "auc")])
    return _table(header, rows)


def delong_vs(run: Run, reference: Run) -> float | None:
    """DeLong p-value of the AUC difference between two runs on their common subjects."""
    ours = {r["subject_id"]: r for r in run.summary["classification"]["per_subject"]}
    theirs = {r["subject_id"]: r for r in reference.summary["classification"]["per_subject"]}
    common = sorted(set(ours) & set(theirs))
    labels = np.array([ours[s]["label"] for s in common])
    if len(common) < 2 or labels.min() == labels.max():
        return None
    _, _, p = metric_fns.delong_test(labels, np.array([ours[s]["prob"] for s in common]),
                                     np.array([theirs[s]["prob"] for s in common]))
    return float(p)


def table_classification_by_model(by_model: dict[str, Run]) -> list[str]:
    """Table 3: classification of each model (with AUC and DeLong p against MLSSP)."""
    header = ["model", "alpha"] + [f"{name} {col}" for name in ("Acc %", "Sens", "Spec", "AUC")
                                   for col in ("(ours)", "(paper)")] + ["DeLong p vs MLSSP"]
    reference = by_model.get("mlssp")
    rows = []
    for name, run in by_model.items():
        cls = run.summary["classification"]
        if not cls:
            continue
        paper = PAPER_CLS_BY_MODEL.get(name, (None,) * 4)
        cells = [c for key, ref in zip(CLS_KEYS + ("auc",), paper, strict=True)
                 for c in (_cell(cls, key, key == "accuracy"), _paper(ref, key == "accuracy"))]
        p = delong_vs(run, reference) if reference and name != "mlssp" else None
        rows.append([MODEL_TITLES.get(name, name), str(run.alpha)] + cells
                    + ["-" if p is None else f"{p:.3f}"])
    return _table(header, rows)


def table_segmentation_by_model(by_model: dict[str, Run]) -> list[str]:
    """The numbers behind Fig. 4: pooled segmentation metrics of each model."""
    rows = [[MODEL_TITLES.get(name, name), str(run.alpha)]
            + [_cell(run.summary["segmentation"], key) for key in SEG_KEYS]
            for name, run in by_model.items() if run.summary["segmentation"]]
    return _table(["model", "alpha", "DSC", "Sens", "Spec", "PPV"], rows)


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def figure_per_subject(runs: Sequence[Run], path: Path) -> bool:
    """Fig. 3: per-subject DSC, sensitivity, specificity and PPV of MLSSP, one box per alpha."""
    mlssp = sorted((r for r in runs if r.model == "mlssp" and r.summary["segmentation"]),
                   key=lambda r: str(r.alpha))
    if not mlssp:
        return False
    fig = Figure(figsize=(12, 3.4))
    axes = fig.subplots(1, len(SEG_KEYS))
    rng = np.random.default_rng(0)  # jitter of the dots only
    for ax, key in zip(axes, SEG_KEYS, strict=True):
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
    _save(fig, path)
    return True


def figure_dsc_by_model(by_model: dict[str, Run], path: Path) -> bool:
    """Fig. 4: mean DSC (bootstrap 95% CI as error bars) of each segmentation model."""
    runs = [r for r in by_model.values() if r.summary["segmentation"]]
    if not runs:
        return False
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
    _save(fig, path)
    return True


def figure_roc(by_model: dict[str, Run], path: Path) -> bool:
    """Fig. 6: ROC curves of the pooled out-of-fold probabilities, AUC in the legend."""
    runs = [r for r in by_model.values() if r.summary["classification"]]
    if not runs:
        return False
    fig = Figure(figsize=(4.8, 4.6))
    ax = fig.subplots()
    for run in runs:
        rows = run.summary["classification"]["per_subject"]
        labels = np.array([row["label"] for row in rows])
        fpr, tpr, _ = metric_fns.roc_curve(labels, np.array([row["prob"] for row in rows]))
        auc = run.summary["classification"]["auc"]
        label = MODEL_TITLES.get(run.model, run.model)
        ax.plot(fpr, tpr, drawstyle="steps-post",
                label=f"{label} (AUC {auc:.3f})" if auc is not None else label)
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC by model (pooled out-of-fold)")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)
    return True


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def figure_training_curves(runs: Sequence[Run], path: Path) -> bool:
    """Training loss (solid, left axis) and inner-validation score (dashed, right axis) per
    epoch, one panel per run, one colour per fold."""
    logs = [(run, sorted(run.workdir.glob("fold_*/metrics.jsonl"))) for run in runs]
    logs = [(run, files) for run, files in logs if files]
    if not logs:
        return False
    cols = min(3, len(logs))
    rows = -(-len(logs) // cols)
    fig = Figure(figsize=(4.4 * cols, 3.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (run, files) in zip(axes, logs, strict=False):
        score_ax = ax.twinx()
        for index, file in enumerate(files):
            records = _read_jsonl(file)
            epochs = [r["epoch"] for r in records]
            ax.plot(epochs, [r.get("train_loss") for r in records], color=f"C{index}",
                    label=file.parent.name)
            score_ax.plot(epochs, [r.get(VAL_SCORE) for r in records], color=f"C{index}",
                          ls="--")
        score_ax.set_ylim(0, 1)
        score_ax.set_ylabel("inner-val score", fontsize=8)
        ax.set_title(run.title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("train loss")
        ax.legend(fontsize=6, loc="upper center")
    for ax in axes[len(logs):]:
        ax.set_visible(False)
    fig.suptitle("Training curves\n(solid: train loss; dashed: inner-validation score)",
                 fontsize=9)
    _save(fig, path)
    return True


def _prediction_files(run: Run) -> dict[str, Path]:
    """subject_id -> the run's saved VOI prediction (fold_K/predictions/<id>.npz)."""
    return {p.stem: p for p in sorted(run.workdir.glob("fold_*/predictions/*.npz"))}


def _axial(volume: np.ndarray, k: int) -> np.ndarray:
    """Axial slice k of a (D, H, W[, 1]) RAS volume, transposed for imshow (origin lower)."""
    return np.asarray(volume).reshape(volume.shape[:3])[:, :, k].T


def figure_overlays(by_model: dict[str, Run], path: Path, count: int = OVERLAY_SUBJECTS) -> bool:
    """Fig. 5: axial slices through the lesion: ground truth, then each model's mask.

    Subjects are spread evenly over the ids that every segmentation model has predicted.
    """
    runs = [r for r in by_model.values() if r.summary["segmentation"]]
    files = [_prediction_files(r) for r in runs]
    common = sorted(set.intersection(*(set(f) for f in files))) if files else []
    if not common:
        return False
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
    _save(fig, path)
    return True


def _run_table(runs: Sequence[Run]) -> list[str]:
    rows = [[r.workdir.name, MODEL_TITLES.get(r.model, r.model), str(r.alpha),
             ", ".join(map(str, r.summary["folds"])),
             ", ".join(map(str, r.summary["missing_folds"])) or "-",
             str(r.summary["n_subjects"])] for r in runs]
    return _table(["run", "model", "alpha", "folds", "missing folds", "subjects"], rows)


FIGURES = (("fig3_per_subject.png", "Fig. 3: per-subject segmentation metrics of MLSSP by alpha"),
           ("fig4_dsc_by_model.png", "Fig. 4: mean DSC by model"),
           ("fig5_overlays.png", "Fig. 5: segmentation overlays (ground truth and each model)"),
           ("fig6_roc_by_model.png", "Fig. 6: ROC curves by model"),
           ("training_curves.png", "Training curves"))


def write_figures(runs: Sequence[Run], by_model: dict[str, Run], out: Path) -> list[str]:
    """Draw every figure that the runs allow into ``out``; return the file names written."""
    drawn = {FIGURES[0][0]: figure_per_subject(runs, out / FIGURES[0][0]),
             FIGURES[1][0]: figure_dsc_by_model(by_model, out / FIGURES[1][0]),
             FIGURES[2][0]: figure_overlays(by_model, out / FIGURES[2][0]),
             FIGURES[3][0]: figure_roc(by_model, out / FIGURES[3][0]),
             FIGURES[4][0]: figure_training_curves(runs, out / FIGURES[4][0])}
    return [name for name, ok in drawn.items() if ok]


def render_markdown(runs: Sequence[Run], by_model: dict[str, Run], alpha, figures) -> str:
    """The text of report.md: runs, Tables 1-3, segmentation by model, figures, notes."""
    lines = ["# MLSSP reproduction report", "", "## Runs", "", *_run_table(runs), ""]
    if alpha is not None:
        lines += [f"Best MLSSP alpha: **{alpha}** (highest mean of pooled DSC and accuracy; "
                  "selected on the cross-validated results themselves, as in the paper, so "
                  "optimistic). Table 3 and Fig. 4-6 use each model's run at this alpha.", ""]
    lines += ["## Whole scan and lesion-centred VOI", "", *table_protocols(runs), "",
              "Whole scan: sliding windows over the held-out subject's whole preprocessed brain "
              "with the post-processing chosen on inner validation; false positive = predicted "
              "mL more than 10 mm from the true lesion; detected = share of lesions touched by "
              "the prediction; AUC from the VOI centred on the predicted lesion. VOI: the "
              "paper's protocol, a VOI centred on the true lesion (Tables 1-3 below).", "",
              "## Table 1: segmentation by alpha (MLSSP)", "",
              *table_segmentation_by_alpha(runs), "",
              "## Table 2: classification by alpha (MLSSP)", "",
              *table_classification_by_alpha(runs), "",
              "## Table 3: classification by model", "",
              *table_classification_by_model(by_model), "",
              "## Segmentation by model (the numbers behind Fig. 4)", "",
              *table_segmentation_by_model(by_model), "",
              "Ours: mean over subjects (segmentation) or on the pooled out-of-fold "
              "probabilities (classification), with a percentile bootstrap 95% CI over subjects "
              "in brackets. *Italic* columns marked (paper) are the published numbers of "
              f"{PAPER}. DeLong p: two-sided test of the AUC difference against MLSSP on the "
              "same subjects.", "", "## Figures", ""]
    titles = dict(FIGURES)
    for name in figures:
        lines += [f"### {titles[name]}", "", f"![{titles[name]}]({name})", ""]
    return "\n".join(lines)


def write_report(run_dirs: Sequence[Path], out: Path) -> Path:
    """Write ``out/report.md`` and its figures (atomically, as one directory)."""
    for workdir in run_dirs:
        if not workdir.is_dir():
            raise InputError(f"{workdir}: no such run directory")
    runs = [load_run(Path(w)) for w in run_dirs]
    alpha = best_alpha(runs)
    by_model = runs_by_model(runs, alpha)
    with atomic_dir(out) as tmp:
        figures = write_figures(runs, by_model, tmp)
        (tmp / "report.md").write_text(render_markdown(runs, by_model, alpha, figures))
    return out / "report.md"


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m mlssp_jax.report", description=__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="finished run directories")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    args = parser.parse_args(argv)
    cli.setup_logging()
    path = write_report(args.run_dirs, args.out)
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run_command(main))
