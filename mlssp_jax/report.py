"""The paper's tables and figures from finished runs (``python -m mlssp_jax.report``).

``python -m mlssp_jax.report RUN_DIRS... --out R`` writes ``R/report.md`` (Table 1:
segmentation by alpha, Table 2: classification by alpha, Table 3: classification by model,
with bootstrap 95% CIs, DeLong p-values against MLSSP, and the paper's numbers beside ours;
Tables 2-3 by the paper's VOI protocol and by the whole-scan pipeline, Table 3 also the
descriptor classifier on each run's own predicted lesion, with DeLong p against that run's
CNN), the calibration table (Brier, ECE) and the PNG figures it links (Fig. 3-6 of the paper,
the training curves and the reliability diagram). A run is
identified by its ``config.toml`` (model, alpha); its numbers come from ``summary.json``
(computed on the fly by :mod:`mlssp_jax.evaluate` if the file is missing).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from mlssp_jax import cli
from mlssp_jax.errors import InputError
from mlssp_jax.fileio import atomic_dir
from mlssp_jax.report_figures import FIGURES, write_figures
from mlssp_jax.report_tables import (
    MODEL_TITLES,
    PAPER,
    Run,
    best_alpha,
    load_run,
    markdown_table,
    runs_by_model,
    table_calibration,
    table_classification_by_alpha,
    table_classification_by_model,
    table_protocols,
    table_segmentation_by_alpha,
    table_segmentation_by_model,
)

log = logging.getLogger(__name__)


def _run_table(runs: Sequence[Run]) -> list[str]:
    rows = [[r.workdir.name, MODEL_TITLES.get(r.model, r.model), str(r.alpha),
             ", ".join(map(str, r.summary["folds"])),
             ", ".join(map(str, r.summary["missing_folds"])) or "-",
             str(r.summary["n_subjects"])] for r in runs]
    return markdown_table(["run", "model", "alpha", "folds", "missing folds", "subjects"], rows)


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
              "Descriptors: an L2 logistic regression on seven lesion descriptors (log volume, "
              "centroid depth below the brain surface, solidity, and relative to the scan's own "
              "parenchyma over soft tissue: the lesion's median HU, its core's texture without "
              "the scan's noise, the 0-4 mm rim's median HU, the share of voxels 15 HU denser "
              "than the parenchyma 2-15 mm around the lesion), "
              "fitted per fold on the true masks of the training folds and applied to the "
              "descriptors of the lesion the pipeline itself predicts on each held-out whole "
              "scan (no true mask at test time).", "",
              "## Calibration", "", *table_calibration(by_model), "",
              "Brier: mean squared error of the probabilities; ECE: expected calibration "
              "error over equal-width bins (see the reliability diagram); ECE if calibrated: "
              "the median ECE (and 95% range) of labels drawn from the model's own "
              "probabilities (consistency resampling), what sampling alone gives a calibrated "
              "model on this many subjects; p: the share of those at least as large as the "
              "observed ECE (small: miscalibrated beyond chance).", "",
              "## Segmentation by model (the numbers behind Fig. 4)", "",
              *table_segmentation_by_model(by_model), "",
              "Ours: mean over subjects (segmentation) or on the pooled out-of-fold "
              "probabilities (classification), with a percentile bootstrap 95% CI over subjects "
              "in brackets. *Italic* columns marked (paper) are the published numbers of "
              f"{PAPER}. DeLong p: two-sided test of the AUC difference against MLSSP on the "
              "same subjects by the same protocol, or (descriptor rows) against the CNN branch "
              "of the same run on the same whole scans.", "", "## Figures", ""]
    titles = dict(FIGURES)
    for name in figures:
        lines += [f"### {titles[name]}", "", f"![{titles[name]}]({name})", ""]
    return "\n".join(lines)


def check_out(run_dirs: Sequence[Path], out: Path) -> None:
    """Refuse an ``out`` the report would destroy: it replaces ``out`` as a whole, so ``out``
    must be new or an earlier report, and hold none of the runs."""
    for workdir in run_dirs:
        if not workdir.is_dir():
            raise InputError(f"{workdir}: no such run directory")
        if out.resolve() in (workdir.resolve(), *workdir.resolve().parents):
            raise InputError(f"--out {out}: holds the run {workdir}; choose another folder")
    if out.exists() and any(out.iterdir()) and not (out / "report.md").is_file():
        raise InputError(f"--out {out}: exists and is not a report folder (no report.md); "
                         "the report replaces it as a whole")


def write_report(run_dirs: Sequence[Path], out: Path) -> Path:
    """Write ``out/report.md`` and its figures (atomically, as one directory)."""
    check_out(run_dirs, out)
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
