"""Skull-strip quality per scan: bone-like mL left, brain mL, lesion kept.

    python benchmarks/skullstrip.py --data MANIFEST [--limit N] [--set data.strip_rim_mm=8]

Preprocesses each scan of the manifest as ``python -m mlssp_jax.preprocess`` does (resample,
strip, window) and measures with :func:`mlssp_jax.skullstrip.strip_report`: bone-like voxels
= brain voxels at the top of the window (WL 50 / WW 100: HU >= 100) farther than 5 mm from
the true lesion (mL), the brain's volume (mL) and the fraction of the lesion inside the brain.
Prints a markdown table and writes ``benchmarks/results/<--name>.json`` (atomically).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, write_result  # noqa: E402

from mlssp_jax import config as config_lib  # noqa: E402
from mlssp_jax import manifest, nifti, preprocess, skullstrip  # noqa: E402


def measure(subject: manifest.Subject, data_cfg: config_lib.DataConfig) -> dict:
    """One scan's row: id, bone-like mL > 5 mm from the lesion, brain mL, lesion kept, s."""
    start = time.perf_counter()
    image = nifti.load_image(subject.image)
    mask = nifti.load_mask(subject.mask, like=image)
    out = preprocess.preprocess_volume(image, mask, data_cfg)
    report = skullstrip.strip_report(out["image"] >= 1.0, out["brain"], out["mask"],
                                     data_cfg.spacing_mm)
    return {"subject_id": subject.subject_id, **report,
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="manifest CSV with masks")
    parser.add_argument("--limit", type=int, default=0, help="first N scans only (0: all)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--name", default="skullstrip", help="results/<name>.json")
    args = parser.parse_args()
    data_cfg = config_lib.load(None, args.set).data
    subjects = manifest.read_manifest(args.data, require_masks=True)
    rows = [measure(s, data_cfg) for s in subjects[:args.limit or None]]
    for row in rows:
        row["lesion_kept_pct"] = 100.0 * row["lesion_kept"]
    print(markdown_table(rows, [("subject_id", "scan", "s"),
                                ("bone_ml", "bone-like mL > 5 mm", ".1f"),
                                ("brain_ml", "brain mL", ".0f"),
                                ("lesion_kept_pct", "lesion kept %", ".2f"),
                                ("seconds", "s", ".1f")]))
    write_result(args.name, {"data": str(args.data), "params": skullstrip.params(data_cfg),
                            "rows": rows})


if __name__ == "__main__":
    main()
