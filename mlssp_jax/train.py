"""``python -m mlssp_jax.train``: train and evaluate folds of a stratified cross-validation.

    python -m mlssp_jax.train --config configs/quick.toml --fold 2 --alpha 0.4

writes ``W/config.toml``, ``W/splits.json`` and ``W/fold_K/{checkpoints/, metrics.jsonl,
eval.json, predictions/}`` (SPEC.md). The logic lives in :mod:`mlssp_jax.train_lib`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from mlssp_jax import cli, parallel, rundir, splits, train_lib
from mlssp_jax import config as config_lib
from mlssp_jax.errors import InputError, TrainingDiverged
from mlssp_jax.ops import cpu_env

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The command's options; every config field can also be set with ``--set``."""
    p = cli.ArgumentParser(
        prog="python -m mlssp_jax.train",
        description="Train fold K of a stratified k-fold split (data-parallel over every device "
                    "of every host) and evaluate its best checkpoint on the held-out fold.",
        epilog="Resolved config -> W/config.toml; per fold W/fold_K/{checkpoints/, "
               "metrics.jsonl, eval.json, predictions/}. Multi-host: run one process per host "
               "with --distributed (Cloud TPU VMs, SLURM) or --coordinator/--num-processes/"
               "--process-id.")
    p.add_argument("--config", type=Path, help="TOML config (default: built-in defaults = paper)")
    p.add_argument("--data", help="manifest CSV (default: the built-in synthetic cohort)")
    p.add_argument("--workdir", type=Path,
                   help="run directory (default: runs/<config name>_<model>_alpha<alpha>)")
    p.add_argument("--fold", required=True,
                   help="fold to train, 0..num_folds-1, or 'all' for every fold in turn")
    p.add_argument("--alpha", help="segmentation loss weight in [0, 1], or 'auto' (learned)")
    p.add_argument("--model", choices=config_lib.MODEL_NAMES, help="model variant")
    p.add_argument("--epochs", type=int, help="training epochs")
    p.add_argument("--batch-size", type=int, help="global batch size (all devices and hosts)")
    p.add_argument("--seed", type=int, help="seed of the split, init and loader")
    p.add_argument("--resume", action="store_true",
                   help="continue each fold from its latest checkpoint (a finished fold is "
                        "only re-evaluated)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field, e.g. --set model.width=16 (repeatable)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: jax.distributed.initialize() with cluster auto-detection")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="multi-host coordinator address")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def resolve_config(args: argparse.Namespace) -> config_lib.Config:
    """The config file, then the first-class flags, then ``--set`` overrides."""
    flags = {"train.alpha": args.alpha, "model.name": args.model, "train.epochs": args.epochs,
             "train.batch_size": args.batch_size, "train.seed": args.seed}
    overrides = [f"{key}={value}" for key, value in flags.items() if value is not None]
    if args.data is not None:  # quoted: a path is a string whatever TOML would make of it
        overrides.append(f"data.manifest={json.dumps(str(Path(args.data).absolute()))}")
    return config_lib.load(args.config, overrides + args.set)


def folds_to_run(fold: str, num_folds: int) -> list[int]:
    """``--fold`` as a list of fold indices."""
    if fold == "all":
        return list(range(num_folds))
    if not fold.isdigit():
        raise InputError(f"--fold: must be 0..{num_folds - 1} or 'all', got {fold!r}")
    splits.check_fold(int(fold), num_folds)
    return [int(fold)]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    config = resolve_config(args)
    folds = folds_to_run(args.fold, config.train.num_folds)
    workdir = args.workdir or rundir.default_workdir(args.config, config)
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                    auto=args.distributed)
    try:
        for fold in folds:
            train_lib.train_and_evaluate(config, workdir, fold, resume=args.resume)
    except TrainingDiverged as err:
        return cli.diverged(err, workdir)
    log.info("done: %s", workdir)
    return 0


if __name__ == "__main__":
    cpu_env.prepare_process()  # glibc malloc tunables and XLA flags, read at process start
    raise SystemExit(cli.run_command(main))
