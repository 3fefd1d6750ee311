"""Segment and classify whole scans never seen in training (``python -m mlssp_jax.predict``).

``python -m mlssp_jax.predict --workdir W --image SCAN [SCAN ...|DIR] [--out O] [--fold K]
[--tta]``: each scan is preprocessed as in training (no mask), segmented by Gaussian-weighted
sliding windows over the brain with the ensemble of the run's finished folds (or fold K),
classified from the VOI centred on the largest predicted lesion, and its mask resampled
back (trilinear probability, then threshold) to the scan's own grid and affine. Writes
``O/<name>_mask.nii.gz`` (the scan's shape and affine) and ``O/<name>.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from mlssp_jax import (
    checkpointing,
    cli,
    cpu_env,
    inference,
    models,
    nifti,
    postprocess,
    preprocess,
    train_lib,
    wholescan,
)
from mlssp_jax import config as config_lib
from mlssp_jax.errors import InputError
from mlssp_jax.fileio import write_json

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DEFAULT_OVERLAP = 0.5
DEFAULT_BATCH = 2


def finished_folds(workdir: Path, num_folds: int) -> list[int]:
    """Folds of the run with an ``eval.json`` (training and evaluation finished)."""
    return [k for k in range(num_folds) if (workdir / f"fold_{k}" / "eval.json").is_file()]


def load_ensemble(workdir: Path, fold: int | None = None
                  ) -> tuple[config_lib.Config, list[int], inference.PredictFn]:
    """The run's config, the folds used and one predict_fn averaging their best checkpoints."""
    cfg = config_lib.load(workdir / "config.toml")
    if not models.has_tasks(cfg.model.name)[0]:
        raise InputError(f"{workdir}: model '{cfg.model.name}' has no segmentation branch")
    done = finished_folds(workdir, cfg.train.num_folds)
    if fold is not None:
        if fold not in done:
            raise InputError(f"--fold {fold}: fold not finished in {workdir} (finished: {done})")
        done = [fold]
    if not done:
        raise InputError(f"{workdir}: no finished fold (no fold_K/eval.json)")
    apply = train_lib.make_predict_fn(cfg)
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
    return (moved >= threshold).astype(np.uint8)


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel of a grid with this affine, in mL (1 mL = 1000 mm^3)."""
    return abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0


def predict_scan(image: nifti.Volume, predict_fn: inference.PredictFn, cfg: config_lib.Config,
                 overlap: float = DEFAULT_OVERLAP, batch_size: int = DEFAULT_BATCH,
                 tta: bool = False, rule: dict | None = None) -> dict:
    """Mask (uint8, the input's shape), ``volume_ml`` and ``avm_probability`` of one scan,
    after the post-processing ``rule`` (:mod:`mlssp_jax.postprocess`; None: brain only)."""
    pre = preprocess.preprocess_volume(image, None, cfg.data)
    window, threshold = cfg.data.voi_size, cfg.train.threshold
    prob = wholescan.segment(pre["image"], pre["brain"], predict_fn, window, overlap,
                             batch_size, tta, progress=True)
    kept = postprocess.apply(prob > threshold, pre["brain"], rule or postprocess.NONE,
                             wholescan.voxel_ml(cfg.data.spacing_mm))
    prob = np.where((prob > threshold) & ~kept, 0.0, prob)  # removed components: background
    avm_probability, centre = inference.classify(pre["image"], prob, predict_fn, window,
                                                 threshold, batch_size)
    mask = resample_to_input(prob, pre["affine"], image.affine, image.data.shape, threshold)
    return {"mask": mask, "volume_ml": float(mask.sum()) * voxel_volume_ml(image.affine),
            "avm_probability": avm_probability,
            "label": None if avm_probability is None else int(avm_probability >= threshold),
            "voi_centre_mm": (pre["affine"] @ np.append(centre, 1.0))[:3].round(1).tolist()}


def scan_paths(items: Sequence[Path]) -> list[Path]:
    """The NIfTI files named, a directory standing for the NIfTI files in it (sorted)."""
    paths = []
    for item in items:
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
            if not found:
                raise InputError(f"{item}: no .nii or .nii.gz file in the directory")
            paths += found
        elif not item.is_file():
            raise InputError(f"{item}: no such file or directory")
        elif not item.name.endswith(NIFTI_SUFFIXES):
            raise InputError(f"{item}: not a NIfTI file (.nii or .nii.gz)")
        else:
            paths.append(item)
    return paths


def scan_name(path: Path) -> str:
    """The file name without .nii / .nii.gz."""
    return path.name.removesuffix(".gz").removesuffix(".nii")


def write_outputs(out: Path, path: Path, image: nifti.Volume, result: dict, info: dict) -> None:
    """``out/<name>_mask.nii.gz`` (the input's grid) and ``out/<name>.json``, each atomically."""
    name = scan_name(path)
    nifti.save(out / f"{name}_mask.nii.gz", result["mask"], image.affine)
    record = {"image": str(path), **{k: v for k, v in result.items() if k != "mask"},
              "voxels": int(result["mask"].sum()), **info}
    write_json(out / f"{name}.json", record)


def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m mlssp_jax.predict", description=__doc__)
    parser.add_argument("--workdir", required=True, type=Path, help="a trained run directory")
    parser.add_argument("--image", required=True, nargs="+", type=Path,
                        help="NIfTI scans, or directories of them")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output directory")
    parser.add_argument("--fold", type=int, default=None, help="use this fold only")
    parser.add_argument("--tta", action="store_true", help="average over the 48 cube symmetries")
    parser.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP,
                        help="sliding-window overlap in [0, 1)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="windows per batch")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cli.setup_logging()
    if not 0.0 <= args.overlap < 1.0:
        raise InputError(f"--overlap: must be in [0, 1), got {args.overlap}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size: must be >= 1, got {args.batch_size}")
    paths = scan_paths(args.image)
    cfg, folds, predict_fn = load_ensemble(args.workdir, args.fold)
    rule = postprocess.ensemble_rule(args.workdir, folds)
    info = {"model": cfg.model.name, "folds": folds, "threshold": cfg.train.threshold,
            "tta": args.tta, "overlap": args.overlap, "postprocessing": rule}
    for path in tqdm(paths, desc="predict", unit="scan"):
        image = nifti.load_image(path)
        result = predict_scan(image, predict_fn, cfg, args.overlap,
                              args.batch_size, args.tta, rule)
        write_outputs(args.out, path, image, result, info)
        log.info("%s: %.2f mL, AVM probability %s", path.name, result["volume_ml"],
                 result["avm_probability"])
    return 0


if __name__ == "__main__":
    cpu_env.maybe_reexec()  # glibc malloc tunables, read only at process start
    raise SystemExit(cli.run_command(main))
