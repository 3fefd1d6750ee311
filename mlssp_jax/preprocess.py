"""Preprocessing of head CT: 1 mm RAS resampling, skull stripping, windowing; cached per cohort.

``python -m mlssp_jax.preprocess [--data MANIFEST] --out DIR [--workers N]`` writes
``DIR/<subject_id>.npz`` per SPEC.md: ``image`` float32 (D, H, W) in [0, 1] (WL 50 / WW 100,
0 outside the brain), ``brain`` uint8, ``mask`` uint8, ``affine`` (4, 4) float64 mapping an
output array index to the input's world mm, plus ``hu`` float16 (the skull-stripped HU,
``AIR_HU`` outside the brain: ``window(hu) == image``, for augmenting before windowing),
``lesion_kept_fraction`` and ``cache_key``.

Geometry is handled in physical space, so any input orientation (RAS, LPS, oblique) and
spacing gives the same output. The output grid is axis-aligned with the world (RAS+ canonical:
array axes i, j, k = +x right, +y anterior, +z superior), ``spacing_mm`` isotropic, covering
the head. Each output voxel is sampled from the input through the composed affines
``inv(A_in) @ A_out`` in one ``scipy.ndimage.affine_transform`` (linear). The mask is resampled
as float (coverage from 2^3 linear samples per output voxel) and thresholded at 0.5, which
preserves its volume (mL) and world centroid.

Skull stripping (on the resampled HU): :func:`mlssp_jax.skullstrip.skull_strip`, with the
edge of the scanned field of view acting as a wall where the slab cuts through the head;
:func:`preprocess_volume` reports the fraction of the lesion kept.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import os
import zipfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from mlssp_jax import cache, nifti, skullstrip, verify
from mlssp_jax import config as config_lib
from mlssp_jax import manifest as manifest_lib
from mlssp_jax.cli import ArgumentParser, run_command, setup_logging, worker_logging
from mlssp_jax.config import DataConfig
from mlssp_jax.errors import InputError
from mlssp_jax.fileio import atomic_path, inside, staged_outputs, write_json

log = logging.getLogger(__name__)

PREPROCESS_VERSION = 5  # bump when the algorithm changes: invalidates every cache
AIR_HU = -1024.0  # value sampled outside the scanned field of view
HEAD_HU = -300.0  # above this: head (for the bounding box of the output grid)
HEAD_MARGIN_MM = 4.0  # margin around the head's bounding box
MASK_THRESHOLD = 0.5  # the float-resampled mask is lesion where >= this
MASK_SUPERSAMPLE = 2  # mask coverage per output voxel from SUPERSAMPLE^3 linear samples
KEPT_WARN_FRACTION = 0.99  # log a warning if skull stripping keeps less of a lesion


def preprocessing_params(data_cfg: DataConfig) -> dict[str, Any]:
    """Every parameter that changes a preprocessed file (part of the cache key)."""
    return {"version": PREPROCESS_VERSION, "spacing_mm": data_cfg.spacing_mm,
            "window_level_hu": data_cfg.window_level_hu,
            "window_width_hu": data_cfg.window_width_hu, "air_hu": AIR_HU, "head_hu": HEAD_HU,
            "head_margin_mm": HEAD_MARGIN_MM, **skullstrip.params(data_cfg),
            "mask_threshold": MASK_THRESHOLD, "mask_supersample": MASK_SUPERSAMPLE}


def window(hu: np.ndarray, level_hu: float, width_hu: float) -> np.ndarray:
    """Map HU linearly: ``level - width/2`` -> 0, ``level + width/2`` -> 1, clipped; float32."""
    low = level_hu - width_hu / 2.0
    return np.clip((hu.astype(np.float32) - np.float32(low)) / np.float32(width_hu), 0.0, 1.0)


def output_grid(image_hu: np.ndarray, affine: np.ndarray,
                spacing_mm: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine (index -> world mm) of the RAS-aligned ``spacing_mm`` grid over the head.

    The head's index bounding box (HU > ``HEAD_HU``; whole image if none) is mapped to world
    through ``affine``; its world box plus ``HEAD_MARGIN_MM``, snapped to multiples of the
    spacing, becomes the grid, so the grid depends on the anatomy's world position only.
    """
    head = image_hu > HEAD_HU
    if not head.any():
        head = np.ones_like(head)
    bounds = [np.flatnonzero(head.any(axis=tuple(a for a in range(3) if a != axis)))
              for axis in range(3)]
    corners_index = np.array([[b[0] if bit == 0 else b[-1]
                               for b, bit in zip(bounds, bits, strict=True)]
                              for bits in np.ndindex(2, 2, 2)], dtype=np.float64)
    corners = corners_index @ affine[:3, :3].T + affine[:3, 3]
    low = np.floor((corners.min(axis=0) - HEAD_MARGIN_MM) / spacing_mm + 1e-6)
    high = np.ceil((corners.max(axis=0) + HEAD_MARGIN_MM) / spacing_mm - 1e-6)
    shape = tuple(int(n) for n in high - low + 1)
    out_affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    out_affine[:3, 3] = low * spacing_mm
    return shape, out_affine


def field_of_view(in_shape: tuple[int, ...], affine: np.ndarray, out_affine: np.ndarray,
                  shape: tuple[int, int, int]) -> np.ndarray:
    """Bool (shape): output voxels whose centre lies inside the input's voxels (the scanned FOV).

    An input voxel ``n`` spans indices ``n - 0.5 .. n + 0.5``; computed separably per axis.
    """
    to_input = np.linalg.inv(affine) @ out_affine
    axes = [np.arange(n, dtype=np.float64) for n in shape]
    inside = np.ones(shape, dtype=bool)
    for a in range(3):
        coord = (to_input[a, 0] * axes[0][:, None, None] + to_input[a, 1] * axes[1][None, :, None]
                 + to_input[a, 2] * axes[2][None, None, :] + to_input[a, 3])
        inside &= (coord >= -0.5) & (coord <= in_shape[a] - 0.5)
    return inside


def resample(data: np.ndarray, affine: np.ndarray, out_affine: np.ndarray,
             shape: tuple[int, int, int], cval: float, fov: np.ndarray | None = None
             ) -> np.ndarray:
    """Sample ``data`` (index grid of ``affine``) on the grid ``(shape, out_affine)``, linearly.

    One ``ndimage.affine_transform`` with the composed map ``inv(affine) @ out_affine``, or,
    when that map is diagonal (the grids' axes parallel: no rotation, no axis swap), the same
    trilinear interpolation as three 1-D passes (:func:`_resample_axis`; 2.9x faster on a
    512x512x37 scan, equal to float32 rounding). Up to half a voxel beyond the input's edge
    the edge value is used (the voxel's extent); outside the field of view (``fov``, default
    :func:`field_of_view`) the value is ``cval``. Returns float32.
    """
    to_input = np.linalg.inv(affine) @ out_affine
    linear = to_input[:3, :3]
    if np.array_equal(linear, np.diag(np.diag(linear))):
        out = np.asarray(data, dtype=np.float32)
        for axis in range(3):
            out = _resample_axis(out, axis, linear[axis, axis], to_input[axis, 3], shape[axis])
    else:
        out = ndimage.affine_transform(np.asarray(data, dtype=np.float32), linear,
                                       offset=to_input[:3, 3], output_shape=shape, order=1,
                                       mode="nearest", output=np.float32)
    out[~(field_of_view(data.shape, affine, out_affine, shape) if fov is None else fov)] = cval
    return out


def _resample_axis(data: np.ndarray, axis: int, scale: float, offset: float,
                   size: int) -> np.ndarray:
    """Linear interpolation along one axis at input coordinates ``scale * i + offset``,
    i = 0..size-1, clamped to the edge values beyond the ends (``mode="nearest"``)."""
    coord = np.clip(scale * np.arange(size) + offset, 0.0, data.shape[axis] - 1.0)
    low = np.minimum(np.floor(coord).astype(int), data.shape[axis] - 2).clip(0)
    frac = (coord - low).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = size
    frac = frac.reshape(shape)
    high = np.minimum(low + 1, data.shape[axis] - 1)
    return np.take(data, low, axis) * (1 - frac) + np.take(data, high, axis) * frac


def _world_box_to_output(corners_index: np.ndarray, affine: np.ndarray, out_affine: np.ndarray,
                         shape: tuple[int, int, int]) -> tuple[slice, ...]:
    """Output-grid slices covering input voxel corners ``corners_index`` (N, 3), plus 2 voxels."""
    to_output = np.linalg.inv(out_affine) @ affine
    points = corners_index @ to_output[:3, :3].T + to_output[:3, 3]
    low = np.clip(np.floor(points.min(axis=0)) - 2, 0, None).astype(int)
    high = np.minimum(np.ceil(points.max(axis=0)) + 3, shape).astype(int)
    return tuple(slice(a, max(a, b)) for a, b in zip(low, high, strict=True))


def resample_mask(mask: np.ndarray, affine: np.ndarray, out_affine: np.ndarray,
                  shape: tuple[int, int, int]) -> np.ndarray:
    """Binary mask on the output grid: lesion where its coverage is >= ``MASK_THRESHOLD``.

    Coverage of an output voxel = mean of ``MASK_SUPERSAMPLE``^3 linear samples of the mask
    (as float) spread over the voxel, so exact ties of a single sample (output planes half-way
    between slices) do not bias the volume. Computed only around the lesion's bounding box.
    """
    out = np.zeros(shape, dtype=bool)
    points = np.argwhere(mask)
    if len(points) == 0:
        return out
    corners = np.array([[lo if b == 0 else hi for lo, hi, b in
                         zip(points.min(0) - 1, points.max(0) + 1, bits, strict=True)]
                        for bits in np.ndindex(2, 2, 2)], dtype=np.float64)
    box = _world_box_to_output(corners, affine, out_affine, shape)
    box_shape = tuple(sl.stop - sl.start for sl in box)
    offsets = (np.arange(MASK_SUPERSAMPLE) + 0.5) / MASK_SUPERSAMPLE - 0.5
    coverage = np.zeros(box_shape, dtype=np.float32)
    for offset in itertools.product(offsets, repeat=3):
        sub_affine = out_affine.copy()
        sub_affine[:3, 3] = out_affine[:3, :3] @ (np.array([sl.start for sl in box]) + offset) \
            + out_affine[:3, 3]
        coverage += resample(mask, affine, sub_affine, box_shape, cval=0.0)
    out[box] = coverage >= MASK_THRESHOLD * MASK_SUPERSAMPLE**3
    return out


def preprocess_arrays(image_hu: np.ndarray, affine: np.ndarray, mask: np.ndarray | None,
                      data_cfg: DataConfig) -> dict[str, Any]:
    """:func:`preprocess_volume` on plain arrays: ``image_hu`` (I, J, K) HU, ``affine`` 4x4 mm."""
    shape, out_affine = output_grid(image_hu, affine, data_cfg.spacing_mm)
    fov = field_of_view(image_hu.shape, affine, out_affine, shape)
    hu = resample(image_hu, affine, out_affine, shape, cval=AIR_HU, fov=fov)
    brain = skullstrip.skull_strip(hu, fov, data_cfg)
    image = np.where(brain, window(hu, data_cfg.window_level_hu, data_cfg.window_width_hu), 0.0)
    stripped_hu = np.where(brain, hu, AIR_HU).astype(np.float16)
    if mask is None:
        lesion = np.zeros(shape, dtype=bool)
    else:
        lesion = resample_mask(mask, affine, out_affine, shape)
    n_lesion = int(np.count_nonzero(lesion))
    kept = float(np.count_nonzero(lesion & brain)) / n_lesion if n_lesion else 1.0
    return {"image": image.astype(np.float32), "brain": brain.astype(np.uint8),
            "mask": lesion.astype(np.uint8), "affine": out_affine, "lesion_kept_fraction": kept,
            "hu": stripped_hu}


def preprocess_volume(image: nifti.Volume, mask: nifti.Volume | None,
                      data_cfg: DataConfig) -> dict[str, Any]:
    """Resample to 1 mm RAS, skull-strip and window one scan (``mask`` None: an all-zero mask).

    Returns ``image`` float32 (D, H, W) in [0, 1] (0 outside the brain), ``hu`` float16 (D, H, W)
    skull-stripped HU (``AIR_HU`` outside the brain), ``brain`` and ``mask``
    uint8 (D, H, W), ``affine`` (4, 4) output index -> the input's world mm, and
    ``lesion_kept_fraction`` (lesion voxels inside the brain mask / lesion voxels; 1.0 if none).
    """
    mask_data = None if mask is None else mask.data
    return preprocess_arrays(image.data, image.affine, mask_data, data_cfg)


def _file_identity(path: Path | None) -> list[Any] | None:
    """Path, size and mtime of a file; of each file in it for a folder (a DICOM series)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        return [str(path.resolve()), [_file_identity(p) for p in sorted(path.iterdir())
                                      if p.is_file()]]
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def subject_cache_key(subject: manifest_lib.Subject, data_cfg: DataConfig) -> str:
    """Hash of the preprocessing parameters and the subject's input files (path, size, mtime)."""
    blob = json.dumps({"params": preprocessing_params(data_cfg), "id": subject.subject_id,
                       "image": _file_identity(subject.image),
                       "mask": _file_identity(subject.mask)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _is_fresh(path: Path, key: str) -> bool:
    try:
        with np.load(path) as npz:
            return str(npz["cache_key"]) == key
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
        return False


def _preprocess_subject(subject: manifest_lib.Subject, out_path: Path, data_cfg: DataConfig,
                        key: str) -> float:
    """Check every voxel of one subject, preprocess it into ``out_path`` (atomically); returns
    its lesion kept fraction."""
    image, mask = verify.load_subject(subject)
    result = preprocess_volume(image, mask, data_cfg)
    with atomic_path(out_path) as tmp:
        np.savez_compressed(tmp, cache_key=np.array(key), **result)
    return result["lesion_kept_fraction"]


def _log_kept(kept: dict[str, float]) -> None:
    """One line: the least of a lesion skull stripping kept, and whose (per subject: DEBUG)."""
    for subject_id, fraction in kept.items():
        log.debug("%s: skull stripping kept %.2f%% of the lesion", subject_id, 100 * fraction)
    if not kept:
        return
    worst = min(kept, key=kept.__getitem__)
    low = [sid for sid, fraction in kept.items() if fraction < KEPT_WARN_FRACTION]
    log.log(logging.WARNING if low else logging.INFO,
            "preprocess: skull stripping kept >= %.2f%% of every lesion (least: %s)%s",
            100 * kept[worst], worst,
            f"; {len(low)} below {100 * KEPT_WARN_FRACTION:g}%: {', '.join(low)}" if low else "")


def preprocess_cohort(subjects: Sequence[manifest_lib.Subject], out_dir: str | Path,
                      data_cfg: DataConfig, workers: int = 1) -> dict[str, Path]:
    """Preprocess ``subjects`` into ``out_dir/<subject_id>.npz``, reusing fresh cached files.

    Validates before writing: every subject's headers first (:func:`verify.check_headers`),
    each subject's voxels by the worker that preprocesses it; this run's files go to a
    staging folder and are moved into ``out_dir`` only once every subject succeeded
    (:func:`fileio.staged_outputs`), so a failure leaves ``out_dir`` as it was.
    A file is reused only if its stored ``cache_key`` matches :func:`subject_cache_key`, so a
    changed parameter or input file is recomputed. Runs ``workers`` processes (spawned; 1 =
    in this process) with a progress bar. Writes ``out_dir/preprocess.json`` (params and each
    subject's ``lesion_kept_fraction``). Returns ``{subject_id: npz path}`` in input order.
    """
    out_dir = Path(out_dir)
    verify.check_headers(subjects)
    paths = {s.subject_id: inside(out_dir, out_dir / f"{s.subject_id}.npz") for s in subjects}
    keys = {s.subject_id: subject_cache_key(s, data_cfg) for s in subjects}
    todo = [s for s in subjects if not _is_fresh(paths[s.subject_id], keys[s.subject_id])]
    log.info("preprocess: %d of %d subjects cached in %s", len(subjects) - len(todo),
             len(subjects), out_dir)
    with staged_outputs(out_dir) as stage:
        staged = {sid: stage / path.name for sid, path in paths.items()}
        kept = dict(_run(todo, staged, keys, data_cfg, workers))
        kept_all = {sid: kept[sid] if sid in kept else _stored_kept(path)
                    for sid, path in paths.items()}
        write_json(stage / "preprocess.json",
                   {"params": preprocessing_params(data_cfg), "lesion_kept_fraction": kept_all})
    _log_kept(kept_all)
    return paths


def _run(todo: list[manifest_lib.Subject], paths: dict[str, Path], keys: dict[str, str],
         data_cfg: DataConfig, workers: int):
    """Yield ``(subject_id, kept_fraction)`` as subjects finish (process pool if workers > 1)."""
    with tqdm(total=len(todo), desc="preprocess", unit="scan", disable=not todo) as bar:
        if workers <= 1 or len(todo) <= 1:
            for s in todo:
                sid = s.subject_id
                yield sid, _preprocess_subject(s, paths[sid], data_cfg, keys[sid])
                bar.update()
            return
        ctx = get_context("spawn")
        with worker_logging(ctx) as logs:
            pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, **logs)
            try:
                futures = {pool.submit(_preprocess_subject, s, paths[s.subject_id], data_cfg,
                                       keys[s.subject_id]): s.subject_id for s in todo}
                for future in as_completed(futures):
                    yield futures[future], future.result()
                    bar.update()
            finally:  # after a failure, do not start the subjects still queued
                pool.shutdown(cancel_futures=True)


def _stored_kept(path: Path) -> float:
    with np.load(path) as npz:
        return float(npz["lesion_kept_fraction"])


def resolve_data(data_cfg) -> Path:
    """The manifest to use: ``data_cfg.manifest``, or the built-in synthetic cohort's."""
    if data_cfg.manifest:
        path = Path(data_cfg.manifest).expanduser()
        if not path.is_file():
            raise InputError(f"{path}: no such manifest file")
        return path
    from mlssp_jax import synth  # the generator is only needed without --data

    return synth.default_manifest(data_cfg)


def cached_cohort(manifest_path: str | Path, data_cfg: DataConfig, workers: int | None = None,
                  subjects: Sequence[manifest_lib.Subject] | None = None) -> dict[str, Path]:
    """Preprocess a manifest's cohort into the cache (once) and return ``{subject_id: npz}``.

    The cache folder is ``<cache root>/preprocessed/<hash of params and manifest path>``; inside
    it each file is checked against its inputs (see :func:`preprocess_cohort`). A file lock
    makes concurrent callers (e.g. the processes of a multi-host run) do the work once.
    ``workers`` defaults to the CPU count; ``subjects``: the manifest's, if the caller has
    read it already (else it is read here).
    """
    manifest_path = Path(manifest_path).resolve()
    if subjects is None:
        subjects = manifest_lib.read_manifest(manifest_path, require_masks=True)
    tag = json.dumps({"params": preprocessing_params(data_cfg), "manifest": str(manifest_path)},
                     sort_keys=True)
    digest = hashlib.sha256(tag.encode()).hexdigest()[:16]
    out_dir = cache.cache_root(data_cfg) / "preprocessed" / digest
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return preprocess_cohort(subjects, out_dir, data_cfg, workers or os.cpu_count() or 1)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mlssp_jax.preprocess``: preprocess a manifest's scans into DIR."""
    parser = ArgumentParser(prog="python -m mlssp_jax.preprocess",
                            description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="manifest CSV (SPEC.md); default: the built-in "
                        "synthetic cohort (generated and cached on first use)")
    parser.add_argument("--out", required=True, help="output folder for <subject_id>.npz")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="parallel processes (default: CPU count)")
    parser.add_argument("--config", help="TOML config whose [data] section sets the parameters")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.workers < 1:
        parser.error("--workers: must be >= 1")
    data_cfg = config_lib.load(args.config, args.set).data
    manifest_path = Path(args.data) if args.data else resolve_data(data_cfg)
    subjects = manifest_lib.read_manifest(manifest_path, require_masks=False)
    preprocess_cohort(subjects, Path(args.out), data_cfg, args.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
