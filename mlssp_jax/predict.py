"""Segment and classify whole scans never seen in training (``python -m mlssp_jax.predict``).

``python -m mlssp_jax.predict --workdir W --image SCAN [SCAN ...|DIR] [--out O] [--fold K]
[--tta [none|flips|all]] [--window S] [--overlap F] [--batch-size B] [--no-gaussian]``: each
scan is preprocessed as in training (no mask), segmented by Gaussian-weighted sliding windows
over the brain (only windows holding a brain voxel; window, overlap, batch, weighting and
TTA from the run's ``[inference]`` config section, each option overriding its field) with
the ensemble of the run's finished folds (or fold K; TTA views computed on the device),
classified from the VOI centred on the largest predicted lesion, and its mask resampled
back (trilinear probability, then threshold) to the scan's own grid and affine. Writes
``O/<name>_mask.nii.gz`` (the scan's shape and affine) and ``O/<name>.json``, plus
``O/<name>_overlay.png`` and ``O/predictions.csv`` (:mod:`mlssp_jax.scan_outputs`). A SCAN
is a NIfTI file or a DICOM series folder; a DIR of NIfTI files means those files
(:mod:`mlssp_jax.scans`). Logs the wall and CPU seconds of the start-up and of each scan
(load / preprocess / windows / classify / resample / descriptors / write); compiled
programs are cached under ``$MLSSP_JAX_CACHE/jax_cache``.
"""

from __future__ import annotations

import dataclasses
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
    calibration,
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

def load_ensemble(workdir: Path, fold: int | None = None, tta: str | None = None
                  ) -> tuple[config_lib.Config, list[int], ensemble.Ensemble]:
    """The run's config, the folds used and their best checkpoints in one
    :class:`~mlssp_jax.ensemble.Ensemble` (``tta`` views; None: the run's
    ``inference.tta``), each fold's probabilities recentred on the threshold it chose on its
    inner validation and its classification probability calibrated as on its inner
    validation (``fold_K/calibration.json``, :mod:`mlssp_jax.calibration`)."""
    cfg = rundir.read_config(workdir)
    tta = tta or cfg.inference.tta
    if not models.has_tasks(cfg.model.name)[0]:
        raise InputError(f"{workdir}: model '{cfg.model.name}' has no segmentation branch")
    done = rundir.finished_folds(workdir, cfg.train.num_folds)
    if fold is not None:
        if fold not in done:
            raise InputError(f"--fold {fold}: fold not finished in {workdir} (finished: {done})")
        done = [fold]
    if not done:
        raise InputError(f"{workdir}: no finished fold (no fold_K/eval.json)")
    like = models.abstract_params(cfg.model, cfg.data.voi_size)  # once: tracing takes ~0.3 s
    params = [_restore(workdir, k, like) for k in done]
    _, thresholds = postprocess.ensemble_rule(workdir, done)
    offsets = [ensemble.logit_offset(t or cfg.train.threshold, cfg.train.threshold)
               for t in thresholds]
    cals = [calibration.load(rundir.fold_dir(workdir, k)) for k in done]
    return cfg, done, ensemble.make_ensemble(cfg.model, params, tta, offsets, cals)


def _restore(workdir: Path, fold: int, like):
    """The fold's best parameters (the structure of ``like``); InputError naming the
    checkpoint folder if there is none or it is damaged."""
    directory = rundir.checkpoint_dir(workdir, fold)
    if not directory.is_dir():
        raise InputError(f"{directory}: no checkpoints (fold {fold} not trained?)")
    try:
        manager = checkpointing.open_manager(directory, read_only=True)
        best = manager.best_step()
        if best is None:
            raise InputError(f"{directory}: no complete checkpoint")
        params = checkpointing.restore_params(manager, best, like)[0]
        manager.close()
        return params
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many types on bad files
        where = rundir.checkpoint_dir(workdir, fold)
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise InputError(f"{where}: cannot restore the best checkpoint "
                         f"({type(err).__name__}: {first})") from None


brain_box = inference.brain_box
resample_to_input = inference.resample_mask


def window_settings(cfg: config_lib.Config) -> tuple[int, float, int]:
    """(window edge in voxels, overlap, windows per batch) from ``cfg.inference``, its 0s
    resolved: the training VOI, :func:`inference.auto_batch`."""
    window = cfg.inference.window or cfg.data.voi_size
    return (window, cfg.inference.overlap,
            cfg.inference.batch_size or inference.auto_batch(window))


def predict_scan(image: nifti.Volume, model: ensemble.Ensemble | inference.PredictFn,
                 cfg: config_lib.Config, timings: dict | None = None,
                 rule: dict | None = None) -> dict:
    """Mask (uint8, the input's shape), ``volume_ml``, ``avm_probability`` and the largest
    predicted lesion's ``descriptors`` of one scan.

    ``model``: an Ensemble (its ``windows`` call for the sliding windows, ``voi`` for the
    classification VOI) or one predict_fn for both. The sliding windows follow
    ``cfg.inference`` (:func:`window_settings`, ``gaussian``). ``timings``, if given,
    receives ``(wall s, CPU s)`` of ``preprocess``, ``windows``, ``classify``, ``resample``
    and ``descriptors`` (CPU: this process's threads, a load-independent measure on a shared
    machine).
    """
    windows_fn, voi_fn = ((model.windows, model.voi) if isinstance(model, ensemble.Ensemble)
                          else (model, model))
    clock = _Clock(timings)
    pre = preprocess.preprocess_volume(image, None, cfg.data)
    clock.lap("preprocess")
    rule = rule or postprocess.NONE
    window, overlap, batch_size = window_settings(cfg)
    threshold = postprocess.threshold_of(rule, cfg.train.threshold)
    box = inference.brain_box(pre["brain"], window)
    prob = np.zeros(pre["image"].shape, np.float32)
    prob[box] = inference.sliding_window_predict(
        pre["image"][box], windows_fn, window, overlap, batch_size, progress=True,
        brain=pre["brain"][box], gaussian=cfg.inference.gaussian)
    found = metrics.binarize(prob, threshold)  # post-processing (None: brain only)
    kept = postprocess.apply(found, pre["brain"], rule, wholescan.voxel_ml(cfg.data.spacing_mm),
                             hu=pre["hu"])
    prob = wholescan.kept_probability(prob, kept, threshold)
    clock.lap("windows")
    avm_probability, centre = inference.classify(pre["image"], prob, voi_fn, cfg.data.voi_size,
                                                 threshold)
    clock.lap("classify")
    mask = inference.resample_mask(prob, pre["affine"], image.affine, image.data.shape,
                                   threshold)
    clock.lap("resample")
    label = (None if avm_probability is None
             else int(metrics.binarize(avm_probability, cfg.train.threshold)))
    lesion = predicted_lesion_descriptors(pre, prob, cfg, threshold)
    clock.lap("descriptors")
    return {"mask": mask, "volume_ml": float(mask.sum()) * image.voxel_volume_ml,
            "avm_probability": avm_probability, "label": label,
            "voi_centre_mm": (pre["affine"] @ np.append(centre, 1.0))[:3].round(1).tolist(),
            "descriptors": lesion}


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
    parser.add_argument("--tta", nargs="?", const="all", default=None,
                        choices=sorted(ensemble.TTA_MODES),
                        help="test-time augmentation: none, flips (the 8 mirrorings, 8x the "
                             "windows' compute) or all (the 48 cube symmetries, 48x); --tta "
                             "alone means all (default: the run's inference.tta, none)")
    parser.add_argument("--window", type=int, default=None,
                        help="sliding-window edge in voxels, a multiple of 16 (default: the "
                             "run's inference.window, 0 = the training VOI; larger windows "
                             "change a quick model's masks, see README)")
    parser.add_argument("--overlap", type=float, default=None,
                        help="sliding-window overlap in [0, 1) (default: inference.overlap)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="windows per batch (default: inference.batch_size, 0 = about "
                             "4 x 32^3 voxels)")
    parser.add_argument("--no-gaussian", action="store_true",
                        help="average overlapping windows uniformly, not Gaussian-weighted")
    parser.add_argument("--dicom-seg", action="store_true",
                        help="also write O/<name>_seg.dcm (DICOM SEG) for DICOM series inputs")
    return parser


def use_compilation_cache() -> None:
    """Keep XLA's compiled programs in ``$MLSSP_JAX_CACHE/jax_cache`` (default
    ``~/.cache/mlssp_jax/jax_cache``; JAX_COMPILATION_CACHE_DIR, if set, wins), so a second
    ``predict`` with the same model, window and batch does not compile again. Every program
    is kept: JAX's default keeps only those that took >= 1 s to compile, and the windows
    call compiles in 0.5-2 s depending on the machine's load, so a warm run compiled it
    again about every other time."""
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", str(cache.cache_root() / "jax_cache"))


def with_options(cfg: config_lib.Config, args) -> config_lib.Config:
    """``cfg`` with the command's ``--window``/``--overlap``/``--batch-size``/``--tta``/
    ``--no-gaussian`` (those given) in its ``inference`` section."""
    given = {"window": args.window, "overlap": args.overlap, "batch_size": args.batch_size,
             "tta": args.tta, "gaussian": False if args.no_gaussian else None}
    updates = {k: v for k, v in given.items() if v is not None}
    return dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference, **updates))


def _check_options(args) -> None:
    if args.overlap is not None and not 0.0 <= args.overlap < 1.0:
        raise InputError(f"--overlap: must be in [0, 1), got {args.overlap}")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.window is not None and (args.window < 16 or args.window % 16):
        raise InputError(f"--window: must be a positive multiple of 16, got {args.window}")


def _since_process_start() -> float:
    """Wall seconds since this process started (Linux ``/proc``; nan elsewhere)."""
    try:
        ticks = float(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return float("nan")


def classification_source(asked: str, have_descriptor_classifiers: bool) -> str:
    """The classifier ``predict`` reports (``inference.classifier``): ``descriptors`` only if
    the run has descriptor classifiers (else ``cnn``, with a warning)."""
    if asked == "descriptors" and not have_descriptor_classifiers:
        log.warning("inference.classifier = descriptors, but the run has no "
                    "descriptor_classifier.json: avm_probability is the CNN branch's")
        return "cnn"
    return asked


def with_classification(result: dict, source: str, threshold: float) -> dict:
    """``result`` with ``avm_probability`` and ``label`` from ``source`` (``cnn`` or
    ``descriptors``: ``descriptor_avm_probability``), the CNN's kept as
    ``cnn_avm_probability``; a None probability (no lesion) gives label None."""
    cnn = result["avm_probability"]
    chosen = result["descriptor_avm_probability"] if source == "descriptors" else cnn
    label = None if chosen is None else int(metrics.binarize(chosen, threshold))
    return {**result, "avm_probability": chosen, "label": label, "cnn_avm_probability": cnn}


def main(argv: Sequence[str] | None = None) -> int:
    imports = (_since_process_start(), time.process_time())  # start-up and imports
    args = _parser().parse_args(argv)
    cli.setup_logging()
    _check_options(args)
    timings: dict = {"start-up": imports}
    clock = _Clock(timings)
    paths = scans.scan_paths(args.image)
    last = verify.check_scans(paths)  # every scan's headers, then voxels, before any output
    clock.lap("check and read scans")
    use_compilation_cache()
    cfg, folds, model = load_ensemble(args.workdir, args.fold, args.tta)
    cfg = with_options(cfg, args)
    window, overlap, batch = window_settings(cfg)
    info = {"model": cfg.model.name, "folds": folds, "threshold": cfg.train.threshold,
            "tta": model.tta, "overlap": overlap, "window": window, "batch_size": batch,
            "gaussian": cfg.inference.gaussian,
            "postprocessing": postprocess.ensemble_rule(args.workdir, folds)[0]}
    classifiers = descriptor_eval.load_fold_models(args.workdir, folds)
    info["descriptor_classifier_folds"] = [
        k for k in folds if rundir.descriptor_classifier_path(args.workdir, k).is_file()]
    info["classifier"] = classification_source(cfg.inference.classifier, bool(classifiers))
    clock.lap(f"restore {len(folds)} folds")
    _log_timings("run", timings)
    rows = []
    with staged_outputs(args.out) as stage:  # into --out only once every scan succeeded
        for index, path in enumerate(tqdm(paths, desc="predict", unit="scan")):
            start, timings = time.perf_counter(), {}
            clock = _Clock(timings)
            image = last if index == len(paths) - 1 else scans.load_scan(path)  # read once
            clock.lap("load")
            result = predict_scan(image, model, cfg, timings, info["postprocessing"])
            # the folds' descriptor classifiers on the predicted lesion (None: no lesion, or a
            # run without descriptor_classifier.json files)
            result["descriptor_avm_probability"] = descriptor_classifier.lesion_probabilities(
                classifiers, [result["descriptors"]])[0]
            result = with_classification(result, info["classifier"], cfg.train.threshold)
            clock = _Clock(timings)
            row = scan_outputs.write_scan(stage, path, image, result, info, args.dicom_seg)
            clock.lap("write")
            rows.append({**row, "seconds": round(time.perf_counter() - start, 2)})
            log.info("%s: %.2f mL (ABC/2 %s mL), AVM probability %s (%s; CNN %s, descriptors "
                     "%s)", path.name, result["volume_ml"], row["abc2_ml"],
                     result["avm_probability"], info["classifier"],
                     result["cnn_avm_probability"], result["descriptor_avm_probability"])
            _log_timings(path.name, timings)
        scan_outputs.write_table(stage, rows)
    return 0


def _log_timings(what: str, timings: dict) -> None:
    log.info("%s: wall s %s (CPU s %s)", what,
             " / ".join(f"{k} {v[0]:.2f}" for k, v in timings.items()),
             " / ".join(f"{v[1]:.2f}" for v in timings.values()))


if __name__ == "__main__":
    cpu_env.prepare_process(reexec=False)  # XLA flags; no glibc re-exec (it would import
    # everything again, ~2-5 s, and the tunables did not change the windows' time: 2.0 CPU-s)
    raise SystemExit(cli.run_command(main))
