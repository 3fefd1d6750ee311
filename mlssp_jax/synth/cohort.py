"""Writing a cohort: NIfTI files, ``manifest.csv`` and ``subjects.csv``; the cached default
cohort; the command line ``python -m mlssp_jax.synth``."""

from __future__ import annotations

import concurrent.futures
import csv
import fcntl
import logging
import multiprocessing
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from mlssp_jax import cache, nifti
from mlssp_jax.cli import ArgumentParser, setup_logging
from mlssp_jax.errors import InputError
from mlssp_jax.fileio import atomic_dir
from mlssp_jax.manifest import COLUMNS
from mlssp_jax.synth.scanner import STORAGE, render_subject
from mlssp_jax.synth.settings import PRESETS, for_scan, preset

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump when the phantom changes: it keys the default-cohort cache
MANIFEST_NAME = "manifest.csv"
FACTS_NAME = "subjects.csv"
FACT_FIELDS = ("subject_id", "label", "preset", "age", "site", "volume_ml", "nominal_ml",
               "depth_mm", "mean_hu", "std_hu", "extent_mm", "irregularity", "edema_mm",
               "n_vessels", "calcified", "head_mm", "grey_hu", "white_hu", "blood_hu",
               "spacing_mm", "slice_mm", "n_slices", "coverage", "coverage_mm", "orientation",
               "tilt_deg", "noise_hu", "blur_mm", "storage")


def subject_ids(n_subjects: int) -> list[str]:
    """``sub-001``, ``sub-002``, ... (at least 3 digits)."""
    digits = max(3, len(str(n_subjects)))
    return [f"sub-{i + 1:0{digits}d}" for i in range(n_subjects)]


def cohort_labels(n_subjects: int, n_avm: int, seed: int) -> np.ndarray:
    """``(n_subjects,)`` int labels, ``n_avm`` ones at seeded random positions."""
    labels = np.zeros(n_subjects, dtype=int)
    labels[np.random.default_rng(seed).permutation(n_subjects)[:n_avm]] = 1
    return labels


def write_subject(out_dir: Path, subject_id: str, index: int, label: int, seed: int,
                  small: bool, preset_name: str = "default") -> dict:
    """Render subject ``index`` and write ``images/<id>.nii.gz`` and ``masks/<id>.nii.gz``.

    The image is int16, stored like converted DICOM (scl_slope 1, scl_inter -1024 or 0) or
    without scaling (HU stored directly). Returns the subject's facts (a ``subjects.csv`` row).
    """
    settings = for_scan(preset(preset_name), small)
    hu, mask, grid, facts = render_subject(index, label, seed, settings)
    slope, inter = STORAGE[facts["storage"]]
    stored = (hu - np.float32(inter or 0.0)).astype(np.int16)
    nifti.save(out_dir / "images" / f"{subject_id}.nii.gz", stored, grid.affine,
               slope=slope, inter=inter)
    nifti.save(out_dir / "masks" / f"{subject_id}.nii.gz", mask, grid.affine)
    orientation = "".join(nib.aff2axcodes(grid.affine))
    return {"subject_id": subject_id, "label": int(label), "orientation": orientation, **facts}


def check_options(n_subjects: int, n_avm: int, seed: int, preset_name: str) -> None:
    """``InputError`` naming the option for a bad cohort size, AVM count, seed or preset."""
    if n_subjects < 2:
        raise InputError(f"--subjects: must be at least 2, got {n_subjects}")
    if not 0 <= n_avm <= n_subjects:
        raise InputError(f"--avm: must be in 0..{n_subjects} (--subjects), got {n_avm}")
    if seed < 0:
        raise InputError(f"--seed: must be >= 0, got {seed}")
    preset(preset_name)


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a folder that is not an earlier synthetic cohort."""
    if out_dir.exists() and (not out_dir.is_dir() or (
            any(out_dir.iterdir()) and not (out_dir / FACTS_NAME).is_file())):
        raise InputError(f"{out_dir}: exists and is not a synthetic cohort; choose a new folder")


def _render_all(out_dir: Path, labels: np.ndarray, seed: int, small: bool, preset_name: str,
                workers: int) -> list[dict]:
    """Write every subject into ``out_dir`` (``workers`` processes); their facts, in order."""
    ids = subject_ids(len(labels))
    jobs = [(out_dir, ids[i], i, int(labels[i]), seed, small, preset_name)
            for i in range(len(labels))]
    if workers <= 1:
        return [write_subject(*job) for job in jobs]
    context = multiprocessing.get_context("spawn")  # safe even if the caller holds JAX threads
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(write_subject, *job) for job in jobs]
        return [future.result() for future in futures]


def _write_tables(out_dir: Path, facts: list[dict]) -> None:
    """``manifest.csv`` (SPEC.md) and ``subjects.csv`` (generation facts) in ``out_dir``."""
    with open(out_dir / MANIFEST_NAME, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in facts:
            sid = row["subject_id"]
            writer.writerow([sid, f"images/{sid}.nii.gz", f"masks/{sid}.nii.gz", row["label"]])
    with open(out_dir / FACTS_NAME, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FACT_FIELDS)
        writer.writeheader()
        writer.writerows(facts)


def generate_cohort(out_dir: str | Path, n_subjects: int = 80, n_avm: int = 38, seed: int = 0,
                    small: bool = False, workers: int | None = None,
                    preset_name: str = "default") -> Path:
    """Write a synthetic cohort into ``out_dir`` atomically; return its ``manifest.csv``.

    ``out_dir`` gets ``images/``, ``masks/``, ``manifest.csv`` and ``subjects.csv`` (one
    row of ground truth per subject: volume_ml, site, age, head size, scanner, ...). An
    existing earlier cohort there is replaced once the new one is complete. ``workers``
    processes render subjects in parallel (default: all CPUs; 1 for ``small``).
    """
    check_options(n_subjects, n_avm, seed, preset_name)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    if workers is None:
        workers = 1 if small else min(os.cpu_count() or 1, n_subjects)
    labels = cohort_labels(n_subjects, n_avm, seed)
    with atomic_dir(out_dir) as tmp:
        facts = _render_all(tmp, labels, seed, small, preset_name, workers)
        _write_tables(tmp, facts)
    return out_dir / MANIFEST_NAME


def default_manifest(data_cfg) -> Path:
    """The built-in cohort of ``data_cfg.synth_*``, generated on first use, cached.

    Lives in ``cache.cache_root(data_cfg)/synth/<parameters>/`` (generator version, size, seed,
    preset, small); a lock file makes concurrent first uses generate it once, and the
    folder appears atomically.
    """
    small = "-small" if data_cfg.synth_small else ""
    name = (f"v{GENERATOR_VERSION}-n{data_cfg.synth_subjects}-avm{data_cfg.synth_avm}"
            f"-seed{data_cfg.synth_seed}-{data_cfg.synth_preset}{small}")
    out = cache.cache_root(data_cfg) / "synth" / name
    manifest = out / MANIFEST_NAME
    if manifest.is_file():
        return manifest
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not manifest.is_file():
            log.info("generating the built-in synthetic cohort in %s (first use)", out)
            generate_cohort(out, data_cfg.synth_subjects, data_cfg.synth_avm,
                            data_cfg.synth_seed, data_cfg.synth_small,
                            preset_name=data_cfg.synth_preset)
    return manifest


def main(argv=None) -> int:
    """``python -m mlssp_jax.synth --out DIR [--subjects 80 --avm 38 --seed 0 --preset NAME
    --small --workers N]``."""
    parser = ArgumentParser(prog="python -m mlssp_jax.synth",
                            description="Write a synthetic head-CT cohort (SPEC.md manifest).")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--subjects", type=int, default=80, help="number of subjects")
    parser.add_argument("--avm", type=int, default=38, help="how many are AVM-related (label 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--preset", default="default",
                        help=f"generator settings: {', '.join(PRESETS)} (default: default)")
    parser.add_argument("--small", action="store_true",
                        help="a coarse scan (2-3 mm in-plane, 5 mm slices) of the same heads "
                             "(fast; for tests and the quick config)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes (default: all CPUs; 1 with --small)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers: must be >= 1, got {args.workers}")
    check_options(args.subjects, args.avm, args.seed, args.preset)
    setup_logging()
    start = time.perf_counter()
    manifest = generate_cohort(args.out, args.subjects, args.avm, args.seed, args.small,
                               args.workers, args.preset)
    log.info("wrote %d subjects (%d AVM, preset %s) to %s in %.1f s", args.subjects, args.avm,
             args.preset, manifest, time.perf_counter() - start)
    return 0
