"""Orbax checkpoints of one fold under ``W/fold_K/checkpoints/``: the latest and the best.

A checkpoint is saved after every epoch, numbered by the count of finished epochs, with
three items: ``params`` (the model's parameters as evaluated: the moving average when
``train.ema_decay`` keeps one), ``train_state`` (step, learned log-variances, optimiser
state and, with a moving average, the optimiser's own ``online_params``) and ``meta``
(JSON: epoch, step, seed and that epoch's metrics record). The loader is a pure function
of (seed, epoch, index), so epoch + seed is the whole loader state. Orbax writes each
checkpoint to a temporary directory and renames it when complete, so a process killed
mid-save leaves the previous checkpoint intact; leftover temporaries are removed when the
manager is next opened.

Two are kept: the latest (to resume) and the best by ``meta["score"]`` (higher is better,
the inner-validation score; see :func:`mlssp_jax.fold_eval.selection_score`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from mlssp_jax import config as config_lib
from mlssp_jax import models, rundir
from mlssp_jax.errors import InputError
from mlssp_jax.train_step import eval_params

SCORE = "score"


def _score(metrics: dict[str, float]) -> float:
    return metrics[SCORE]


def open_manager(directory: str | Path, read_only: bool = False) -> ocp.CheckpointManager:
    """A manager keeping the latest checkpoint and the best by inner-validation score."""
    keep = policies.AnyPreservationPolicy([
        policies.LatestN(n=1),
        policies.BestN(get_metric_fn=_score, reverse=False, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        best_fn=_score, best_mode="max", preservation_policy=keep,
        cleanup_tmp_directories=not read_only, read_only=read_only, create=not read_only)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(manager: ocp.CheckpointManager, epoch: int, state: Any, meta: dict, score: float) -> None:
    """Save the state after ``epoch`` finished epochs (asynchronously; atomic on disk).

    ``state`` is a :class:`mlssp_jax.train_step.TrainState`; ``meta`` must be JSON-able.
    Called on every process (orbax coordinates the hosts).
    """
    train_state = {"step": state.step, "log_vars": state.log_vars, "opt_state": state.opt_state}
    if state.ema_params is not None:
        train_state["online_params"] = state.params
    manager.save(epoch, args=ocp.args.Composite(
        params=ocp.args.StandardSave(eval_params(state)),
        train_state=ocp.args.StandardSave(train_state),
        meta=ocp.args.JsonSave(meta),
    ), metrics={SCORE: float(score)})


def restore(manager: ocp.CheckpointManager, epoch: int, like: Any) -> tuple[Any, dict]:
    """Restore the checkpoint of ``epoch`` into the structure and shardings of ``like``.

    Returns ``(state, meta)`` with ``state`` of the same type as ``like``.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    train_state = {"step": abstract.step, "log_vars": abstract.log_vars,
                   "opt_state": abstract.opt_state}
    averaged = like.ema_params is not None
    if averaged:
        train_state["online_params"] = abstract.params
    restored = manager.restore(epoch, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract.params),
        train_state=ocp.args.StandardRestore(train_state),
        meta=ocp.args.JsonRestore(),
    ))
    ts = restored["train_state"]
    state = like.replace(params=ts["online_params"] if averaged else restored["params"],
                         ema_params=restored["params"] if averaged else None, step=ts["step"],
                         log_vars=ts["log_vars"], opt_state=ts["opt_state"])
    return state, dict(restored["meta"])


def restore_params(manager: ocp.CheckpointManager, epoch: int, like: Any) -> tuple[Any, dict]:
    """Restore only the model parameters (and meta) of ``epoch`` into the structure of ``like``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = manager.restore(epoch, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored["params"], dict(restored["meta"])


def restore_best_params(workdir: str | Path, fold: int) -> tuple[Any, config_lib.Config]:
    """The best checkpoint's model parameters of fold ``fold`` and the run's config, for inference.

    Raises :class:`InputError` if the run or the fold has no checkpoint.
    """
    config = rundir.read_config(workdir)
    directory = rundir.checkpoint_dir(workdir, fold)
    if not directory.is_dir():
        raise InputError(f"{directory}: no checkpoints (fold {fold} not trained?)")
    manager = open_manager(directory, read_only=True)
    best = manager.best_step()
    if best is None:
        raise InputError(f"{directory}: no complete checkpoint")
    like = models.abstract_params(config.model, config.data.voi_size)
    params, _ = restore_params(manager, best, like)
    manager.close()
    return params, config
