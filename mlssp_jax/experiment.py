"""The whole paper experiment, resumable (``python -m mlssp_jax.experiment``).

``python -m mlssp_jax.experiment --config configs/quick.toml --out DIR [--alphas ...]
[--models ...]``: MLSSP for every alpha x every fold (``DIR/mlssp_alpha<A>``), then each
baseline at the best MLSSP alpha (``DIR/<model>_alpha<A>``), each run pooled into its
``summary.json``, then the report (``DIR/report/report.md``). The best alpha is chosen as
the paper did, on the pooled cross-validated results (:func:`mlssp_jax.report_tables.best_alpha`:
mean of pooled DSC and accuracy), which is optimistic for that row. A fold with an
``eval.json`` is finished and skipped, so re-running the command resumes the experiment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import jax

from mlssp_jax import cli, evaluate, report, report_tables, rundir, train_lib
from mlssp_jax import config as config_lib
from mlssp_jax.errors import InputError, TrainingDiverged
from mlssp_jax.ops import cpu_env

log = logging.getLogger(__name__)

PAPER_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7)
BASELINES = ("ynet", "he", "unet3d", "cnn")


def run_dir(out: Path, model: str, alpha: float | str) -> Path:
    """``out/<model>_alpha<alpha>`` (:func:`mlssp_jax.rundir.run_name`)."""
    return out / rundir.run_name(model, alpha)


def run_config(base: config_lib.Config, model: str, alpha: float | str) -> config_lib.Config:
    """``base`` with ``model.name`` and ``train.alpha`` set (validated)."""
    alpha_toml = f'"{alpha}"' if isinstance(alpha, str) else repr(alpha)
    return config_lib.apply_overrides(base, [f'model.name="{model}"', f"train.alpha={alpha_toml}"])


def train_run(cfg: config_lib.Config, workdir: Path, n_resamples: int) -> Path:
    """Train and evaluate every unfinished fold of one run, then pool it into summary.json.

    A diverged fold raises :class:`TrainingDiverged` naming the run and the fold.
    """
    rundir.check_config(cfg, workdir)
    finished = rundir.finished_folds(workdir, cfg.train.num_folds)
    for fold in range(cfg.train.num_folds):
        if fold in finished:
            log.info("%s fold %d: finished, skipped", workdir.name, fold)
            continue
        log.info("%s fold %d: training", workdir.name, fold)
        try:
            train_lib.train_and_evaluate(cfg, workdir, fold, resume=True)
        except TrainingDiverged as err:
            raise TrainingDiverged(f"{workdir} fold {fold}: {err}") from None
    rundir.write_summary(workdir, evaluate.summarize(workdir, n_resamples))
    return workdir


def run_experiment(base: config_lib.Config, out: Path, alphas: Sequence[float | str],
                   baselines: Sequence[str],
                   n_resamples: int = evaluate.DEFAULT_RESAMPLES) -> Path:
    """MLSSP over ``alphas``, the baselines at the best alpha, then the report (its path)."""
    mlssp_dirs = [train_run(run_config(base, "mlssp", a), run_dir(out, "mlssp", a), n_resamples)
                  for a in alphas]
    best = report_tables.best_alpha([report_tables.load_run(d) for d in mlssp_dirs])
    log.info("best MLSSP alpha on the pooled results: %s", best)
    baseline_dirs = [train_run(run_config(base, m, best), run_dir(out, m, best), n_resamples)
                     for m in baselines]
    return report.write_report(mlssp_dirs + baseline_dirs, out / "report")


def use_compilation_cache(out: Path) -> None:
    """Keep XLA's compiled programs in ``out/jax_cache`` (unless JAX_COMPILATION_CACHE_DIR is
    set), so the 45 trainings of the experiment compile each model variant once."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
    log.info("XLA compilation cache: %s", out / "jax_cache")


def parse_alphas(text: str) -> list[float | str]:
    """'0.3,0.4' -> [0.3, 0.4]; 'auto' stays a string."""
    alphas: list[float | str] = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            alphas.append(item if item == "auto" else float(item))
        except ValueError:
            raise InputError(f"--alphas: '{item}' is not a number or 'auto'") from None
    if not alphas:
        raise InputError("--alphas: no alpha given")
    return alphas


def parse_models(text: str) -> list[str]:
    """'ynet,cnn' -> ['ynet', 'cnn'] (the baselines; MLSSP always runs)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        if name not in config_lib.MODEL_NAMES or name == "mlssp":
            raise InputError(f"--models: '{name}' is not one of {', '.join(BASELINES)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m mlssp_jax.experiment", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="base config (TOML)")
    parser.add_argument("--out", required=True, type=Path, help="experiment directory")
    parser.add_argument("--alphas", default=",".join(map(str, PAPER_ALPHAS)),
                        help="MLSSP loss weights to sweep, comma-separated")
    parser.add_argument("--models", default=",".join(BASELINES),
                        help="baselines to run at the best alpha ('' for none)")
    parser.add_argument("--bootstrap", type=int, default=evaluate.DEFAULT_RESAMPLES,
                        help="bootstrap resamples for the 95%% CIs")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field (repeatable)")
    args = parser.parse_args(argv)
    cli.setup_logging()
    if args.bootstrap < 1:
        raise InputError(f"--bootstrap: must be >= 1, got {args.bootstrap}")
    base = config_lib.load(args.config, args.set)
    use_compilation_cache(args.out)
    try:
        path = run_experiment(base, args.out, parse_alphas(args.alphas),
                              parse_models(args.models), args.bootstrap)
    except TrainingDiverged as err:
        return cli.diverged(err, "its fold's checkpoints/")
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    cpu_env.prepare_process()  # glibc malloc tunables and XLA flags, read at process start
    raise SystemExit(cli.run_command(main))
