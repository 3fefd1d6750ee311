"""A scan on a clinical 512 x 512 x N grid from a synthetic subject (for predict's timing).

    python -m mlssp_jax.synth --out COHORT --subjects 4 --avm 2 --seed 11
    python benchmarks/scan_512.py COHORT/images/sub-004.nii.gz COHORT/masks/sub-004.nii.gz \
        --out DIR [--slices 37] [--pixel-mm 0.5]

The generator crops its scans to the head; a scanner stores 512 x 512 pixels per slice.
The image (trilinear, air -1000 HU outside) and the mask (nearest) are resampled onto a grid
of ``--pixel-mm`` pixels and ``--slices`` slices spanning the input's slice extent, centred
on the input's centre with its orientation; written as ``DIR/image.nii.gz`` (int16 HU) and
``DIR/mask.nii.gz`` (uint8).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def resample_to(src: nib.Nifti1Image, shape: np.ndarray, spacing: np.ndarray, order: int,
                cval: float) -> tuple[np.ndarray, np.ndarray]:
    """(data of ``shape``, affine): ``src`` on the grid of ``spacing`` mm around its centre."""
    zooms = np.array(src.header.get_zooms()[:3], float)
    centre = src.affine @ np.append((np.array(src.shape) - 1) / 2.0, 1.0)
    affine = src.affine.copy()
    affine[:3, :3] = src.affine[:3, :3] / zooms * spacing
    affine[:3, 3] = centre[:3] - affine[:3, :3] @ ((shape - 1) / 2.0)
    index_map = np.linalg.inv(src.affine) @ affine
    data = ndimage.affine_transform(np.asarray(src.dataobj, np.float32), index_map[:3, :3],
                                    index_map[:3, 3], output_shape=tuple(shape), order=order,
                                    cval=cval)
    return data, affine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("mask", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--slices", type=int, default=37)
    parser.add_argument("--pixel-mm", type=float, default=0.5)
    args = parser.parse_args()
    image = nib.load(args.image)
    extent = image.shape[2] * float(image.header.get_zooms()[2])
    shape = np.array([512, 512, args.slices])
    spacing = np.array([args.pixel_mm, args.pixel_mm, extent / args.slices])
    args.out.mkdir(parents=True, exist_ok=True)
    for name, src, order, cval, dtype in (("image", image, 1, -1000.0, np.int16),
                                          ("mask", nib.load(args.mask), 0, 0.0, np.uint8)):
        data, affine = resample_to(src, shape, spacing, order, cval)
        nib.save(nib.Nifti1Image(np.round(data).astype(dtype), affine),
                 args.out / f"{name}.nii.gz")
        print(f"{name}: {tuple(shape)} at {np.round(spacing, 3).tolist()} mm")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
