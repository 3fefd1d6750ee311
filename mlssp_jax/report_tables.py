"""The runs a report compares and the paper's tables from them (Markdown lines).

A :class:`Run` is a finished run directory: its model and alpha from ``config.toml`` and its
pooled numbers from ``summary.json`` (pooled now by :mod:`mlssp_jax.evaluate` if missing).
Each table puts the paper's published numbers (on its own private data) beside ours.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlssp_jax import evaluate, rundir
from mlssp_jax import metrics as metric_fns
from mlssp_jax.rundir import SEG_KEYS

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
CLS_KEYS = ("accuracy", "sensitivity", "specificity")  # Tables 2-3 (the AUC has its own column)
# The classification blocks of a summary: the paper's VOI on the true lesion, the whole-scan
# pipeline's CNN (the VOI on the predicted lesion) and the descriptor classifier on the
# predicted lesion (evaluate's whole_scan.descriptor_classification).
PROTOCOLS = {"voi": "VOI on the true lesion (paper)", "whole": "whole scan",
             "descriptors": "whole scan"}
PAPER_SEG_KEYS = SEG_KEYS[:4]  # the paper's Table 1 has no HD95 or volume error


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
    cfg = rundir.read_config(workdir)
    summary = rundir.read_summary(workdir)
    if summary is None:
        log.info("%s: no summary.json, pooling its folds now", workdir)
        summary = evaluate.summarize(workdir)
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


def _cell(task: dict | None, key: str, percent: bool = False, digits: int = 3) -> str:
    """'value [low, high]' from a pooled task summary; '-' if absent (e.g. a metric a run
    made by an older version did not record)."""
    if not task or task.get(key) is None:
        return "-"
    scale, digits = (100.0, 2) if percent else (1.0, digits)
    low, high = task["ci95"].get(key) or (None, None)
    text = f"{task[key] * scale:.{digits}f}"
    if low is not None and high is not None:
        text += f" [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"
    return text


def _paper(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"*{value * 100:.2f}*" if percent else f"*{value:.3f}*"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table: a header row, the separator, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def table_segmentation_by_alpha(runs: Sequence[Run]) -> list[str]:
    """Table 1: MLSSP's pooled segmentation metrics by alpha, the paper's beside each; then
    HD95 (mm) and absolute volume error (mL), which the paper does not report."""
    header = (["alpha"] + [f"{name} {col}" for name in ("DSC", "Sens", "Spec", "PPV")
                           for col in ("(ours)", "(paper)")]
              + ["HD95 mm (ours)", "vol. error mL (ours)"])
    rows = []
    for run in sorted((r for r in runs if r.model == "mlssp"), key=lambda r: str(r.alpha)):
        paper = PAPER_SEG_BY_ALPHA.get(run.alpha, (None,) * 4)
        seg = run.summary["segmentation"]
        rows.append([str(run.alpha)] + [c for key, ref in zip(PAPER_SEG_KEYS, paper, strict=True)
                                        for c in (_cell(seg, key), _paper(ref))]
                    + [_cell(seg, "hd95_mm", digits=2), _cell(seg, "volume_error_ml", digits=2)])
    return markdown_table(header, rows)


def cls_block(run: Run, protocol: str) -> dict | None:
    """The pooled classification block of ``run`` for a :data:`PROTOCOLS` key (None if the
    run has none, e.g. a run made before the whole-scan protocol or the descriptors)."""
    if protocol == "voi":
        return run.summary["classification"]
    whole = run.summary.get("whole_scan") or {}
    return whole.get("classification" if protocol == "whole" else "descriptor_classification")


def table_classification_by_alpha(runs: Sequence[Run]) -> list[str]:
    """Table 2: MLSSP's pooled classification by alpha (accuracy in %), by the paper's VOI
    protocol (the paper's numbers beside it) and by the whole-scan pipeline."""
    header = ["alpha", "protocol"] + [f"{name} {col}" for name in ("Acc %", "Sens", "Spec")
                                      for col in ("(ours)", "(paper)")] + ["AUC (ours)"]
    rows = []
    for run in sorted((r for r in runs if r.model == "mlssp"), key=lambda r: str(r.alpha)):
        for protocol in ("voi", "whole"):
            cls = cls_block(run, protocol)
            if cls is None and protocol != "voi":
                continue
            paper = (PAPER_CLS_BY_ALPHA.get(run.alpha, (None,) * 3) if protocol == "voi"
                     else (None,) * 3)
            cells = [c for key, ref in zip(CLS_KEYS, paper, strict=True)
                     for c in (_cell(cls, key, key == "accuracy"),
                               _paper(ref, key == "accuracy"))]
            rows.append([str(run.alpha), PROTOCOLS[protocol]] + cells + [_cell(cls, "auc")])
    return markdown_table(header, rows)


def delong_p(ours: dict | None, theirs: dict | None) -> float | None:
    """DeLong p-value of the AUC difference of two pooled classification blocks on their
    common subjects; None if either is missing or the common subjects are of one class."""
    if not ours or not theirs:
        return None
    a = {r["subject_id"]: r for r in ours["per_subject"]}
    b = {r["subject_id"]: r for r in theirs["per_subject"]}
    common = sorted(set(a) & set(b))
    labels = np.array([a[s]["label"] for s in common])
    if len(common) < 2 or labels.min() == labels.max():
        return None
    _, _, p = metric_fns.delong_test(labels, np.array([a[s]["prob"] for s in common]),
                                     np.array([b[s]["prob"] for s in common]))
    return float(p)


def _cls_row(title: str, run: Run, protocol: str, paper: Sequence[float | None],
             p: float | None, against: str) -> list[str]:
    cls = cls_block(run, protocol)
    cells = [c for key, ref in zip(CLS_KEYS + ("auc",), paper, strict=True)
             for c in (_cell(cls, key, key == "accuracy"), _paper(ref, key == "accuracy"))]
    return ([title, str(run.alpha), PROTOCOLS[protocol]] + cells
            + ["-" if p is None else f"{p:.3f}", against if p is not None else "-"])


def table_classification_by_model(by_model: dict[str, Run]) -> list[str]:
    """Table 3: classification of each model by the paper's VOI protocol (the paper's numbers
    beside it) and by the whole-scan pipeline, DeLong p against MLSSP by the same protocol;
    then the descriptor classifier on each run's own predicted lesion, DeLong p against that
    run's CNN branch on the same whole scans."""
    header = (["model", "alpha", "protocol"]
              + [f"{name} {col}" for name in ("Acc %", "Sens", "Spec", "AUC")
                 for col in ("(ours)", "(paper)")] + ["DeLong p", "p against"])
    reference = by_model.get("mlssp")
    rows = []
    for protocol in ("voi", "whole"):
        for name, run in by_model.items():
            if cls_block(run, protocol) is None:
                continue
            paper = PAPER_CLS_BY_MODEL.get(name, (None,) * 4) if protocol == "voi" else (None,) * 4
            p = (delong_p(cls_block(run, protocol), cls_block(reference, protocol))
                 if reference and name != "mlssp" else None)
            rows.append(_cls_row(MODEL_TITLES.get(name, name), run, protocol, paper, p,
                                 f"MLSSP, {PROTOCOLS[protocol]}"))
    for name, run in by_model.items():
        if cls_block(run, "descriptors") is None:
            continue
        title = MODEL_TITLES.get(name, name)
        p = delong_p(cls_block(run, "descriptors"), cls_block(run, "whole"))
        rows.append(_cls_row(f"descriptors on {title}'s lesion", run, "descriptors",
                             (None,) * 4, p, f"{title}'s CNN branch, whole scan"))
    return markdown_table(header, rows)


CALIBRATION_TITLES = {"voi": "CNN branch, VOI on the true lesion",
                      "whole": "CNN branch, whole scan", "descriptors": "descriptors, whole scan"}


def calibration_curves(run: Run) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(labels, probabilities) of each classification block of ``run``, by a title of
    :data:`CALIBRATION_TITLES` (for the reliability diagram)."""
    curves = {}
    for protocol, title in CALIBRATION_TITLES.items():
        block = cls_block(run, protocol)
        if block:
            rows = block["per_subject"]
            curves[title] = (np.array([r["label"] for r in rows], dtype=float),
                             np.array([r["prob"] for r in rows], dtype=float))
    return curves


def table_calibration(by_model: dict[str, Run]) -> list[str]:
    """Brier score and ECE (pooled out-of-fold, bootstrap CIs) of each classifier."""
    rows = []
    for name, run in by_model.items():
        for protocol, title in CALIBRATION_TITLES.items():
            block = cls_block(run, protocol)
            if block:
                rows.append([MODEL_TITLES.get(name, name), str(run.alpha), title,
                             str(len(block["per_subject"])), _cell(block, "brier"),
                             _cell(block, "ece"), _calibrated_ece(block),
                             str(block.get("calibration_bins", "-"))])
    return markdown_table(["model", "alpha", "classifier", "subjects", "Brier", "ECE",
                           "ECE if calibrated (95% range; p)", "ECE bins"], rows)


def _calibrated_ece(block: dict) -> str:
    """The cell of :func:`mlssp_jax.metrics.ece_if_calibrated`'s reference ("-" for summaries
    written before it)."""
    reference = block.get("ece_if_calibrated")
    if not reference or reference.get("median") is None:
        return "-"
    low, high = reference["range95"]
    return f"{reference['median']:.3f} [{low:.3f}, {high:.3f}]; p {reference['p']:.2f}"


def table_segmentation_by_model(by_model: dict[str, Run]) -> list[str]:
    """The numbers behind Fig. 4: pooled segmentation metrics of each model."""
    rows = [[MODEL_TITLES.get(name, name), str(run.alpha)]
            + [_cell(run.summary["segmentation"], key) for key in PAPER_SEG_KEYS]
            for name, run in by_model.items() if run.summary["segmentation"]]
    return markdown_table(["model", "alpha", "DSC", "Sens", "Spec", "PPV"], rows)


def _median(task: dict | None, key: str) -> str:
    value = task and task.get(f"median_{key}")
    return "-" if value is None else f"{value:.2f}"


def _signed_median(task: dict | None) -> str:
    """``; signed +x.xx`` (the median predicted minus true mL on the scans' grids), or ''."""
    value = task and task.get("median_signed_volume_error_native_ml")
    return "" if value is None else f"; signed {value:+.2f}"


def table_protocols(runs: Sequence[Run]) -> list[str]:
    """Each run by both protocols, whole scan first: what a user gets on a new scan (sliding
    windows, the run's post-processing; "scan grid": its mask resampled to the scan's own
    grid, as predict writes it) beside the paper's VOI centred on the true lesion."""
    header = ["run", "model", "alpha", "whole DSC", "whole HD95 mm", "whole abs volume error mL "
              "(median)", "whole false positive mL (median)", "whole detected", "whole AUC",
              "scan-grid DSC", "scan-grid abs volume error mL (median; signed median)",
              "VOI DSC", "VOI AUC"]
    rows = []
    for run in runs:
        whole = run.summary.get("whole_scan") or {}
        wseg, wcls = whole.get("segmentation"), whole.get("classification")
        rows.append([run.workdir.name, MODEL_TITLES.get(run.model, run.model), str(run.alpha),
                     _cell(wseg, "dsc"), _cell(wseg, "hd95_mm"),
                     f"{_cell(wseg, 'volume_error_ml')} ({_median(wseg, 'volume_error_ml')})",
                     f"{_cell(wseg, 'false_positive_ml')} ({_median(wseg, 'false_positive_ml')})",
                     _cell(wseg, "detected"), _cell(wcls, "auc"), _cell(wseg, "dsc_native"),
                     f"{_cell(wseg, 'volume_error_native_ml')} "
                     f"({_median(wseg, 'volume_error_native_ml')}{_signed_median(wseg)})",
                     _cell(run.summary["segmentation"], "dsc"),
                     _cell(run.summary["classification"], "auc")])
    return markdown_table(header, rows)
