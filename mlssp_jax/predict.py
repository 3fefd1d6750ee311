"""Segment and classify whole scans never seen in training (``python -m mlssp_jax.predict``).

``python -m mlssp_jax.predict --workdir W --image SCAN [SCAN ...|DIR] [--out O] [--fold K]
[--tta]``: each scan is preprocessed as in training (no mask), segmented by Gaussian-weighted
sliding windows over the brain with the ensemble of the run's finished folds (or fold K),
classified from the VOI centred on the largest predicted lesion, and its mask resampled
back (trilinear probability, then threshold) to the scan's own grid and affine. Writes
``O/<name>_mask.nii.gz`` (the scan's shape and affine) and ``O/<name>.json``, plus
``O/<name>_overlay.png`` and ``O/predictions.csv`` (:mod:`mlssp_jax.scan_outputs`). A SCAN
is a NIfTI file or a DICOM series folder; a DIR of NIfTI files means those files
(:mod:`mlssp_jax.scans`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from mlssp_jax import (
    checkpointing,
    cli,
    inference,
    metrics,
    models,
    nifti,
    postprocess,
    preprocess,
    rundir,
    scan_outputs,
    scans,
    train_step,
    wholescan,
)
from mlssp_jax import config as config_lib
from mlssp_jax.errors import InputError
from mlssp_jax.ops import cpu_env

log = logging.getLogger(__name__)

DEFAULT_OVERLAP = 0.5
DEFAULT_BATCH = 2


def load_ensemble(workdir: Path, fold: int | None = None
                  ) -> tuple[config_lib.Config, list[int], inference.PredictFn]:
    """The run's config, the folds used and one predict_fn averaging their best checkpoints."""
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
    apply = train_step.make_predict_fn(cfg)
    fns = [_numpy_fn(apply, checkpointing.restore_best_params(workdir, k)[0]) for k in done]
    return cfg, done, inference.ensemble(fns)


def _numpy_fn(apply, params) -> inference.PredictFn:
    """Bind parameters; return numpy outputs (None for a task the model lacks)."""
    def predict(images: np.ndarray) -> dict:
        out = apply(params, images)
        return {key: None if value is None else np.asarray(value) for key, value in out.items()}
    return predict


def resample_to_input(prob: np.ndarray, prob_affine: np.ndarray, input_affine: np.ndarray,
                      input_shape: Sequence[int], threshold: float) -> np.ndarray:
    """Binary mask (uint8) on the input's grid from a probability volume on the model's grid.

    ``prob_affine`` maps a ``prob`` index to world mm, ``input_affine`` an input index to world
    mm; each input voxel centre takes the trilinearly interpolated probability (0 outside
    ``prob``), thresholded at ``threshold``.
    """
    index_map = np.linalg.inv(prob_affine) @ input_affine  # input index -> prob index
    moved = ndimage.affine_transform(prob.astype(np.float32), index_map[:3, :3], index_map[:3, 3],
                                     output_shape=tuple(input_shape), order=1, mode="constant",
                                     cval=0.0)
    return metrics.binarize(moved, threshold).astype(np.uint8)


def predict_scan(image: nifti.Volume, predict_fn: inference.PredictFn, cfg: config_lib.Config,
                 overlap: float = DEFAULT_OVERLAP, batch_size: int = DEFAULT_BATCH,
                 tta: bool = False, rule: dict | None = None) -> dict:
    """Mask (uint8, the input's shape), ``volume_ml`` and ``avm_probability`` of one scan,
    after the post-processing ``rule`` (:mod:`mlssp_jax.postprocess`; None: brain only)."""
    pre = preprocess.preprocess_volume(image, None, cfg.data)
    window, threshold = cfg.data.voi_size, cfg.train.threshold
    prob = wholescan.segment(pre["image"], pre["brain"], predict_fn, window, overlap,
                             batch_size, tta, progress=True)
    found = metrics.binarize(prob, threshold)
    kept = postprocess.apply(found, pre["brain"], rule or postprocess.NONE,
                             wholescan.voxel_ml(cfg.data.spacing_mm))
    prob = np.where(found & ~kept, 0.0, prob)  # removed components become background
    avm_probability, centre = inference.classify(pre["image"], prob, predict_fn, window,
                                                 threshold, batch_size)
    mask = resample_to_input(prob, pre["affine"], image.affine, image.data.shape, threshold)
    label = None if avm_probability is None else int(metrics.binarize(avm_probability, threshold))
    return {"mask": mask, "volume_ml": float(mask.sum()) * image.voxel_volume_ml,
            "avm_probability": avm_probability, "label": label,
            "voi_centre_mm": (pre["affine"] @ np.append(centre, 1.0))[:3].round(1).tolist()}


def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m mlssp_jax.predict", description=__doc__)
    parser.add_argument("--workdir", required=True, type=Path, help="a trained run directory")
    parser.add_argument("--image", required=True, nargs="+", type=Path,
                        help="NIfTI scans, folders of them, or DICOM series folders")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output directory")
    parser.add_argument("--fold", type=int, default=None, help="use this fold only")
    parser.add_argument("--tta", action="store_true", help="average over the 48 cube symmetries")
    parser.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP,
                        help="sliding-window overlap in [0, 1)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="windows per batch")
    parser.add_argument("--dicom-seg", action="store_true",
                        help="also write O/<name>_seg.dcm (DICOM SEG) for DICOM series inputs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cli.setup_logging()
    if not 0.0 <= args.overlap < 1.0:
        raise InputError(f"--overlap: must be in [0, 1), got {args.overlap}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size: must be >= 1, got {args.batch_size}")
    paths = scans.scan_paths(args.image)
    cfg, folds, predict_fn = load_ensemble(args.workdir, args.fold)
    rule = postprocess.ensemble_rule(args.workdir, folds)
    info = {"model": cfg.model.name, "folds": folds, "threshold": cfg.train.threshold,
            "tta": args.tta, "overlap": args.overlap, "postprocessing": rule}
    rows = []
    for path in tqdm(paths, desc="predict", unit="scan"):
        start = time.perf_counter()
        image = scans.load_scan(path)
        result = predict_scan(image, predict_fn, cfg, args.overlap,
                              args.batch_size, args.tta, rule)
        row = scan_outputs.write_scan(args.out, path, image, result, info, args.dicom_seg)
        rows.append({**row, "seconds": round(time.perf_counter() - start, 2)})
        log.info("%s: %.2f mL (ABC/2 %s mL), AVM probability %s", path.name,
                 result["volume_ml"], row["abc2_ml"], result["avm_probability"])
    scan_outputs.write_table(args.out, rows)
    return 0


if __name__ == "__main__":
    cpu_env.prepare_process()  # glibc malloc tunables and XLA flags, read at process start
    raise SystemExit(cli.run_command(main))
