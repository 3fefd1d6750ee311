"""The run directory ``W`` (SPEC.md, "Outputs of a run"): its paths, name, finished folds and
JSON files, in one place (as nnU-Net's ``paths.py`` / ``get_output_folder``).

Layout::

    W/config.toml                the resolved config (one config per run directory)
    W/splits.json                the saved folds (:mod:`mlssp_jax.splits`)
    W/summary.json               the pooled folds (:mod:`mlssp_jax.evaluate`)
    W/fold_K/checkpoints/        orbax checkpoints (:mod:`mlssp_jax.checkpointing`)
    W/fold_K/metrics.jsonl       one record per epoch
    W/fold_K/eval.json           the held-out fold; its presence marks the fold finished
    W/fold_K/predictions/        one ``<subject_id>.npz`` per held-out subject
    W/fold_K/descriptor_classifier.json  the descriptor classifier (descriptor_eval)

The default run directory is ``runs/<config name>_<model>_alpha<alpha>`` (:func:`default_workdir`),
so two configs, models or alphas never share one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlssp_jax import config as config_lib
from mlssp_jax.errors import InputError
from mlssp_jax.fileio import write_json, write_text

CONFIG_FILE = "config.toml"
SUMMARY_FILE = "summary.json"
EVAL_FILE = "eval.json"
METRICS_FILE = "metrics.jsonl"
DESCRIPTOR_CLASSIFIER_FILE = "descriptor_classifier.json"
DEFAULT_ROOT = Path("runs")
DEFAULT_CONFIG_NAME = "default"  # no --config: the built-in defaults (the paper's settings)

# Metric names of eval.json / summary.json (SPEC.md): per-subject segmentation metrics
# (averaged over subjects) and classification metrics (on the pooled probabilities).
SEG_KEYS = ("dsc", "sensitivity", "specificity", "ppv", "hd95_mm", "volume_error_ml")
CLS_KEYS = ("accuracy", "sensitivity", "specificity", "auc")
VAL_SCORE = "val_score"  # metrics.jsonl: the inner-validation score that selects checkpoints


def run_name(model: str, alpha: float | str) -> str:
    """``<model>_alpha<alpha>``: a run's name inside an experiment directory."""
    return f"{model}_alpha{alpha}"


def default_workdir(config_path: str | Path | None, config: config_lib.Config) -> Path:
    """``runs/<config file stem>_<model>_alpha<alpha>`` (stem ``default`` without a file)."""
    stem = Path(config_path).stem if config_path is not None else DEFAULT_CONFIG_NAME
    return DEFAULT_ROOT / f"{stem}_{run_name(config.model.name, config.train.alpha)}"


def fold_dir(workdir: str | Path, fold: int) -> Path:
    """``W/fold_K``."""
    return Path(workdir) / f"fold_{fold}"


def checkpoint_dir(workdir: str | Path, fold: int) -> Path:
    """``W/fold_K/checkpoints``."""
    return fold_dir(workdir, fold) / "checkpoints"


def predictions_dir(workdir: str | Path, fold: int) -> Path:
    """``W/fold_K/predictions``."""
    return fold_dir(workdir, fold) / "predictions"


def eval_path(workdir: str | Path, fold: int) -> Path:
    """``W/fold_K/eval.json``."""
    return fold_dir(workdir, fold) / EVAL_FILE


def descriptor_classifier_path(workdir: str | Path, fold: int) -> Path:
    """``W/fold_K/descriptor_classifier.json``."""
    return fold_dir(workdir, fold) / DESCRIPTOR_CLASSIFIER_FILE


def metrics_path(workdir: str | Path, fold: int) -> Path:
    """``W/fold_K/metrics.jsonl``."""
    return fold_dir(workdir, fold) / METRICS_FILE


def finished_folds(workdir: str | Path, num_folds: int) -> list[int]:
    """Folds with an ``eval.json`` (trained and evaluated), in order."""
    return [k for k in range(num_folds) if eval_path(workdir, k).is_file()]


def read_config(workdir: str | Path) -> config_lib.Config:
    """``W/config.toml``; InputError if ``W`` is not a run directory."""
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{path}: no such file (not a run directory?)")
    return config_lib.load(path)


def check_config(config: config_lib.Config, workdir: str | Path) -> None:
    """Refuse a run directory that holds another config (cheap: call before any work)."""
    path = Path(workdir) / CONFIG_FILE
    if path.exists() and config_lib.load(path) != config:
        raise InputError(f"{path}: this workdir was made with another config; use a new "
                         "--workdir or the same options")


def write_config(config: config_lib.Config, workdir: str | Path) -> None:
    """Write ``W/config.toml`` (after :func:`check_config`)."""
    check_config(config, workdir)
    write_text(Path(workdir) / CONFIG_FILE, config_lib.to_toml(config))


def read_json(path: Path) -> Any:
    """A JSON file of the run; InputError naming it if it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON: {err}") from None


def read_evals(workdir: str | Path, num_folds: int) -> tuple[dict[int, dict], list[int]]:
    """The finished folds' eval.json by fold, and the fold numbers without one."""
    done = finished_folds(workdir, num_folds)
    evals = {k: read_json(eval_path(workdir, k)) for k in done}
    return evals, [k for k in range(num_folds) if k not in evals]


def write_eval(workdir: str | Path, fold: int, result: dict) -> None:
    """Write ``W/fold_K/eval.json`` (atomically)."""
    write_json(eval_path(workdir, fold), result)


def read_summary(workdir: str | Path) -> dict | None:
    """``W/summary.json``, or None if the run has none yet."""
    path = Path(workdir) / SUMMARY_FILE
    return read_json(path) if path.is_file() else None


def write_summary(workdir: str | Path, summary: dict) -> None:
    """Write ``W/summary.json`` (atomically)."""
    write_json(Path(workdir) / SUMMARY_FILE, summary)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (empty if absent; blank lines skipped)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(workdir: str | Path, fold: int) -> list[dict]:
    """The epoch records of ``W/fold_K/metrics.jsonl`` (empty if absent)."""
    return read_jsonl(metrics_path(workdir, fold))


def write_metrics(workdir: str | Path, fold: int, records: list[dict]) -> None:
    """Rewrite ``W/fold_K/metrics.jsonl`` with ``records`` (atomically)."""
    write_text(metrics_path(workdir, fold), "".join(json.dumps(r) + "\n" for r in records))


def metrics_files(workdir: str | Path) -> list[Path]:
    """Every fold's ``metrics.jsonl`` of a run, sorted by path."""
    return sorted(Path(workdir).glob(f"fold_*/{METRICS_FILE}"))


def prediction_files(workdir: str | Path) -> dict[str, Path]:
    """subject_id -> its saved VOI prediction ``W/fold_K/predictions/<id>.npz``."""
    return {p.stem: p for p in sorted(Path(workdir).glob("fold_*/predictions/*.npz"))}
