"""Does the cheaper inner validation (``train.val_overlap``) rank checkpoints as predict's
overlap does? Whole-scan inner-validation scores of several checkpoints at two overlaps.

    python benchmarks/val_overlap_ranking.py RUN_DIR [RUN_DIR ...] --fold K [--overlaps 0 0.5]

For each run (same data, split and fold, e.g. runs of one config with other settings) it
restores the best and the latest checkpoint of fold K, predicts the fold's inner-validation
whole scans at each overlap with the post-processing chosen per checkpoint (as training
does) and reports the selection score (mean of whole-scan DSC and AUC) and the DSC; then the
Spearman rank correlation of the checkpoints' scores between the overlaps. Prints a markdown
table and writes ``benchmarks/results/val_overlap_ranking.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, write_result  # noqa: E402

from mlssp_jax import (  # noqa: E402
    checkpointing,
    models,
    parallel,
    rundir,
    train_lib,
    train_step,
    wholescan_eval,
)
from mlssp_jax import config as config_lib  # noqa: E402


def checkpoint_scores(workdir: Path, fold: int, overlaps: list[float]) -> list[dict]:
    """One row per kept checkpoint of ``workdir``'s fold: its epoch and score per overlap."""
    cfg = config_lib.load(workdir / "config.toml")
    data = train_lib.load_fold_data(cfg, workdir, fold)
    mesh = parallel.make_mesh()
    predict_fn = train_step.make_predict_fn(cfg, mesh)
    manager = checkpointing.open_manager(rundir.checkpoint_dir(workdir, fold), True)
    like = models.abstract_params(cfg.model, cfg.data.voi_size)
    rows = []
    for epoch in sorted({manager.best_step(), manager.latest_step()}):
        params, _ = checkpointing.restore_params(manager, epoch, like)
        row = {"run": workdir.name, "epoch": epoch}
        for overlap in overlaps:
            val = wholescan_eval.validate(
                predict_fn, params, data["val_volumes"],
                config_lib.apply_overrides(cfg, [f"train.val_overlap={overlap}"]), mesh)
            row[f"score@{overlap}"], row[f"dsc@{overlap}"] = val["val_score"], val["val_dsc"]
        rows.append(row)
    manager.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--overlaps", type=float, nargs=2, default=[0.0, 0.5])
    args = parser.parse_args()
    rows = [row for run in args.runs for row in checkpoint_scores(run, args.fold, args.overlaps)]
    a, b = (np.array([r[f"score@{o}"] for r in rows]) for o in args.overlaps)
    rho = float(stats.spearmanr(a, b).statistic) if len(rows) > 2 else float("nan")
    columns = [("run", "run", "s"), ("epoch", "epoch", "d")] + [
        (f"{kind}@{o}", f"{kind} at overlap {o}", ".3f") for o in args.overlaps
        for kind in ("score", "dsc")]
    print(markdown_table(rows, columns))
    print(f"Spearman rank correlation of the scores at overlaps {args.overlaps}: {rho:.3f}")
    write_result("val_overlap_ranking", {"rows": rows, "spearman": rho})


if __name__ == "__main__":
    main()
