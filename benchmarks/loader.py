"""Loader throughput: training samples/s at 64^3 per augmentation setting and worker count.

    python benchmarks/loader.py [--data MANIFEST] [--workers 0 1 2] [--samples 64]

Runs ``input_pipeline.train_batches`` (the real grain pipeline) over in-memory 64^3 VOIs:
synthetic volumes by default (a noisy head-like image with a spherical lesion; no cohort
needed) or the preprocessed VOIs of ``--data``. Two settings: ``symmetries`` (the paper's 48
cube symmetries only) and ``scipy`` (symmetries + random rotation/scale + elastic + intensity,
one resampling per sample). For each worker count it reports the steady-state rate (once
every worker has delivered) and the time to the first batch (worker start-up). Prints a
markdown table and writes ``benchmarks/results/loader.json`` (atomically).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, write_result  # noqa: E402

from mlssp_jax import input_pipeline  # noqa: E402
from mlssp_jax.config import AugmentConfig, Config, DataConfig, TrainConfig  # noqa: E402

VOI = 64
SETTINGS = {
    "symmetries": AugmentConfig(),
    "scipy": AugmentConfig(random_affine=True, elastic=True, intensity=True),
}


def synthetic_examples(n: int, size: int = VOI, seed: int = 0) -> list[dict]:
    """``n`` VOIs: smooth noisy brain-like image in [0, 1] and a spherical lesion mask."""
    rng = np.random.default_rng(seed)
    grid = np.indices((size,) * 3) - (size - 1) / 2
    examples = []
    for i in range(n):
        radius = rng.uniform(6, 20)
        mask = ((grid - rng.normal(0, 4, (3, 1, 1, 1))) ** 2).sum(0) <= radius**2
        image = np.clip(0.3 + 0.05 * rng.standard_normal(mask.shape) + 0.4 * mask, 0, 1)
        examples.append({"subject_id": f"syn{i:03d}", "image": image.astype(np.float32),
                         "mask": mask.astype(np.uint8), "label": np.float32(i % 2),
                         "voi_size": size})
    return examples


def cohort_examples(manifest: Path) -> list[dict]:
    """The 64^3 VOIs of a manifest's cohort (preprocessed into the cache on first use)."""
    from mlssp_jax import manifest as manifest_lib
    from mlssp_jax import preprocess

    data_cfg = DataConfig(voi_size=VOI)
    paths = preprocess.cached_cohort(manifest, data_cfg)
    subjects = manifest_lib.read_manifest(manifest)
    return input_pipeline.load_examples(paths, [s.subject_id for s in subjects],
                                        [s.label for s in subjects], VOI)


def measure(examples: list[dict], augment_cfg: AugmentConfig, workers: int,
            batch_size: int) -> dict:
    """One epoch through the loader: steady samples/s and seconds to the first batch.

    The steady rate counts from the batch after every worker has delivered its first one
    (worker start-up is reported separately as ``first_batch_s``).
    """
    cfg = Config(data=DataConfig(voi_size=VOI), augment=augment_cfg,
                 train=TrainConfig(batch_size=batch_size, workers=workers, prefetch=2))
    warm = max(workers, 1)
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in input_pipeline.train_batches(examples, cfg, 0, 0)]
    steady = (len(stamps) - warm) * batch_size / max(stamps[-1] - stamps[warm - 1], 1e-9)
    return {"samples_per_s": steady, "first_batch_s": stamps[0] - start,
            "batches": len(stamps), "total_s": stamps[-1] - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="manifest CSV (default: synthetic volumes)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=96, help="samples per measurement")
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    examples = cohort_examples(args.data) if args.data else synthetic_examples(args.samples)
    examples = (examples * (args.samples // len(examples) + 1))[:args.samples]
    rows = []
    for name, augment_cfg in SETTINGS.items():
        for workers in args.workers:
            result = measure(examples, augment_cfg, workers, args.batch_size)
            rows.append({"augment": name, "workers": workers, **result})
            print(f"{name:10s} workers={workers}: {result['samples_per_s']:8.1f} samples/s "
                  f"(first batch {result['first_batch_s']:.2f} s)", flush=True)
    print(markdown_table(rows, [("augment", "augment", "s"), ("workers", "workers", "d"),
                                ("samples_per_s", "samples/s", ".1f"),
                                ("first_batch_s", "first batch s", ".2f")]))
    path = write_result("loader", {
        "voi": VOI, "batch_size": args.batch_size, "samples": args.samples,
        "data": str(args.data) if args.data else "synthetic",
        "settings": {k: dataclasses.asdict(v) for k, v in SETTINGS.items()}, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
