"""Segment and classify whole scans never seen in training (``python -m mlssp_jax.predict``).

``python -m mlssp_jax.predict --workdir W --image SCAN [SCAN ...|DIR] [--out O] [--fold K]
[--tta [none|flips|all]] [--window S] [--overlap F] [--batch-size B] [--no-gaussian]``: each
scan is preprocessed as in training (no mask), segmented by Gaussian-weighted sliding windows
over the brain (only windows holding a brain voxel) with the ensemble of the run's finished
folds (or fold K; their mean and the TTA views computed on the device),
classified from the VOI centred on the largest predicted lesion, and its mask resampled
back (trilinear probability, then threshold) to the scan's own grid and affine. Writes
``O/<name>_mask.nii.gz`` (the scan's shape and affine) and ``O/<name>.json``, plus
``O/<name>_overlay.png`` and ``O/predictions.csv`` (:mod:`mlssp_jax.scan_outputs`). A SCAN
is a NIfTI file or a DICOM series folder; a DIR of NIfTI files means those files
(:mod:`mlssp_jax.scans`). Logs each scan's wall and CPU seconds (load / preprocess /
windows / classify / resample / write); compiled programs are cached under
``$MLSSP_JAX_CACHE/jax_cache``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from mlssp_jax import (
    cache,
    checkpointing,
    cli,
    descriptor_classifier,
    descriptor_eval,
    descriptors,
    ensemble,
    inference,
    metrics,
    models,
    nifti,
    postprocess,
    preprocess,
    rundir,
    scan_outputs,
    scans,
    verify,
    wholescan,
)
from mlssp_jax import config as config_lib
from mlssp_jax.errors import InputError
from mlssp_jax.fileio import staged_outputs
from mlssp_jax.ops import cpu_env

log = logging.getLogger(__name__)

DEFAULT_OVERLAP = 0.5
DEFAULT_BATCH = 4


def load_ensemble(workdir: Path, fold: int | None = None, tta: str = "none"
                  ) -> tuple[config_lib.Config, list[int], ensemble.Ensemble]:
    """The run's config, the folds used and their best checkpoints stacked into one
    :class:`~mlssp_jax.ensemble.Ensemble` (their mean on the device; ``tta`` views), each
    fold's probabilities recentred on the threshold it chose on its inner validation."""
    cfg = rundir.read_config(workdir)
    if not models.has_tasks(cfg.model.name)[0]:
        raise InputError(f"{workdir}: model '{cfg.model.name}' has no segmentation branch")
    done = rundir.finished_folds(workdir, cfg.train.num_folds)
    if fold is not None:
        if fold not in done:
            raise InputError(f"--fold {fold}: fold not finished in {workdir} (finished: {done})")
        done = [fold]
    if not done:
        raise InputError(f"{workdir}: no finished fold (no fold_K/eval.json)")
    params = [_restore(workdir, k) for k in done]
    _, thresholds = postprocess.ensemble_rule(workdir, done)
    offsets = [ensemble.logit_offset(t or cfg.train.threshold, cfg.train.threshold)
               for t in thresholds]
    return cfg, done, ensemble.make_ensemble(cfg.model, params, tta, offsets)


def _restore(workdir: Path, fold: int):
    """The fold's best parameters; InputError naming the checkpoint folder if it is damaged."""
    try:
        return checkpointing.restore_best_params(workdir, fold)[0]
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many types on bad files
        where = rundir.checkpoint_dir(workdir, fold)
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise InputError(f"{where}: cannot restore the best checkpoint "
                         f"({type(err).__name__}: {first})") from None


brain_box = inference.brain_box
resample_to_input = inference.resample_mask


def predict_scan(image: nifti.Volume, model: ensemble.Ensemble | inference.PredictFn,
                 cfg: config_lib.Config, overlap: float = DEFAULT_OVERLAP,
                 batch_size: int = DEFAULT_BATCH, window: int | None = None,
                 gaussian: bool = True, timings: dict | None = None,
                 rule: dict | None = None) -> dict:
    """Mask (uint8, the input's shape), ``volume_ml``, ``avm_probability`` and the largest
    predicted lesion's ``descriptors`` of one scan.

    ``model``: an Ensemble (its ``windows`` call for the sliding windows, ``voi`` for the
    classification VOI) or one predict_fn for both. ``window``: the sliding window's edge in
    voxels (default: the training VOI). ``timings``, if given, receives ``(wall s, CPU s)``
    of ``preprocess``, ``windows``, ``classify`` and ``resample`` (CPU: this process's
    threads, a load-independent measure on a shared machine).
    """
    windows_fn, voi_fn = ((model.windows, model.voi) if isinstance(model, ensemble.Ensemble)
                          else (model, model))
    clock = _Clock(timings)
    pre = preprocess.preprocess_volume(image, None, cfg.data)
    clock.lap("preprocess")
    rule = rule or postprocess.NONE
    window = window or cfg.data.voi_size
    threshold = postprocess.threshold_of(rule, cfg.train.threshold)
    box = inference.brain_box(pre["brain"], window)
    prob = np.zeros(pre["image"].shape, np.float32)
    prob[box] = inference.sliding_window_predict(
        pre["image"][box], windows_fn, window, overlap, batch_size, progress=True,
        brain=pre["brain"][box], gaussian=gaussian)
    found = metrics.binarize(prob, threshold)  # post-processing (None: brain only)
    kept = postprocess.apply(found, pre["brain"], rule, wholescan.voxel_ml(cfg.data.spacing_mm),
                             hu=pre["hu"])
    prob = np.where(found & ~kept, 0.0, prob)  # removed components become background
    clock.lap("windows")
    avm_probability, centre = inference.classify(pre["image"], prob, voi_fn, cfg.data.voi_size,
                                                 threshold)
    clock.lap("classify")
    mask = inference.resample_mask(prob, pre["affine"], image.affine, image.data.shape,
                                   threshold)
    clock.lap("resample")
    label = (None if avm_probability is None
             else int(metrics.binarize(avm_probability, cfg.train.threshold)))
    return {"mask": mask, "volume_ml": float(mask.sum()) * image.voxel_volume_ml,
            "avm_probability": avm_probability, "label": label,
            "voi_centre_mm": (pre["affine"] @ np.append(centre, 1.0))[:3].round(1).tolist(),
            "descriptors": predicted_lesion_descriptors(pre, prob, cfg, threshold)}


def predicted_lesion_descriptors(pre: dict, prob: np.ndarray, cfg: config_lib.Config,
                                 threshold: float) -> dict:
    """:mod:`mlssp_jax.descriptors` of the largest predicted lesion (``prob`` (D, H, W) on
    the preprocessed grid of ``pre``, binarised at the segmentation ``threshold``)."""
    return descriptors.largest_lesion_descriptors(metrics.binarize(prob, threshold), pre, cfg)


class _Clock:
    """(wall s, CPU s) between successive ``lap(name)`` calls, written into ``timings``."""

    def __init__(self, timings: dict | None):
        self.timings, self.last = timings, (time.perf_counter(), time.process_time())

    def lap(self, name: str) -> None:
        now = (time.perf_counter(), time.process_time())
        if self.timings is not None:
            self.timings[name] = (now[0] - self.last[0], now[1] - self.last[1])
        self.last = now


def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m mlssp_jax.predict", description=__doc__)
    parser.add_argument("--workdir", required=True, type=Path, help="a trained run directory")
    parser.add_argument("--image", required=True, nargs="+", type=Path,
                        help="NIfTI scans, folders of them, or DICOM series folders")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output directory")
    parser.add_argument("--fold", type=int, default=None, help="use this fold only")
    parser.add_argument("--tta", nargs="?", const="all", default="none",
                        choices=sorted(ensemble.TTA_MODES),
                        help="test-time augmentation: none (default), flips (the 8 mirrorings, "
                             "8x the windows' compute) or all (the 48 cube symmetries, 48x); "
                             "--tta alone means all")
    parser.add_argument("--window", type=int, default=None,
                        help="sliding-window edge in voxels, a multiple of 16 (default: the "
                             "training VOI; larger windows change a quick model's masks, see "
                             "README)")
    parser.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP,
                        help="sliding-window overlap in [0, 1)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="windows per batch")
    parser.add_argument("--no-gaussian", action="store_true",
                        help="average overlapping windows uniformly, not Gaussian-weighted")
    parser.add_argument("--dicom-seg", action="store_true",
                        help="also write O/<name>_seg.dcm (DICOM SEG) for DICOM series inputs")
    return parser


def use_compilation_cache() -> None:
    """Keep XLA's compiled programs in ``$MLSSP_JAX_CACHE/jax_cache`` (default
    ``~/.cache/mlssp_jax/jax_cache``; JAX_COMPILATION_CACHE_DIR, if set, wins), so a second
    ``predict`` with the same model, window and batch does not compile again."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", str(cache.cache_root() / "jax_cache"))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cli.setup_logging()
    if not 0.0 <= args.overlap < 1.0:
        raise InputError(f"--overlap: must be in [0, 1), got {args.overlap}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.window is not None and (args.window < 16 or args.window % 16):
        raise InputError(f"--window: must be a positive multiple of 16, got {args.window}")
    paths = scans.scan_paths(args.image)
    verify.check_scans(paths)  # every scan's headers, then its voxels, before any output
    use_compilation_cache()
    cfg, folds, model = load_ensemble(args.workdir, args.fold, args.tta)
    window = args.window or cfg.data.voi_size
    info = {"model": cfg.model.name, "folds": folds, "threshold": cfg.train.threshold,
            "tta": args.tta, "overlap": args.overlap, "window": window}
    rule, _ = postprocess.ensemble_rule(args.workdir, folds)
    info["postprocessing"] = rule
    classifiers = descriptor_eval.load_fold_models(args.workdir, folds)
    info["descriptor_classifier_folds"] = [
        k for k in folds if rundir.descriptor_classifier_path(args.workdir, k).is_file()]
    rows = []
    with staged_outputs(args.out) as stage:  # into --out only once every scan succeeded
        for path in tqdm(paths, desc="predict", unit="scan"):
            start = time.perf_counter()
            timings: dict = {}
            clock = _Clock(timings)
            image = scans.load_scan(path)
            clock.lap("load")
            result = predict_scan(image, model, cfg, args.overlap, args.batch_size, window,
                                  not args.no_gaussian, timings, rule)
            # the folds' descriptor classifiers on the predicted lesion (None: no lesion, or a
            # run without descriptor_classifier.json files)
            result["descriptor_avm_probability"] = descriptor_classifier.lesion_probabilities(
                classifiers, [result["descriptors"]])[0]
            clock = _Clock(timings)
            row = scan_outputs.write_scan(stage, path, image, result, info, args.dicom_seg)
            clock.lap("write")
            rows.append({**row, "seconds": round(time.perf_counter() - start, 2)})
            log.info("%s: %.2f mL (ABC/2 %s mL), AVM probability %s (descriptors: %s)",
                     path.name, result["volume_ml"], row["abc2_ml"], result["avm_probability"],
                     result["descriptor_avm_probability"])
            log.info("%s: wall s %s (CPU s %s)", path.name,
                     " / ".join(f"{k} {v[0]:.2f}" for k, v in timings.items()),
                     " / ".join(f"{v[1]:.2f}" for v in timings.values()))
        scan_outputs.write_table(stage, rows)
    return 0


if __name__ == "__main__":
    cpu_env.prepare_process()  # glibc malloc tunables and XLA flags, read at process start
    raise SystemExit(cli.run_command(main))
