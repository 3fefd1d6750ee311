"""Do larger windows or smaller overlaps reproduce the training-size sliding windows?

    python benchmarks/window_tolerance.py --workdir W [--fold K] [--image SCAN --mask MASK]
        [--settings VOI:0.5 VOI:0.5@8 32:0.25 48:0.5 ... box] [--subjects N] [--min-dsc D]
        [--max-truth-drop 0.005] [--json NAME]

For one fold of a run (default: its first finished fold) on its held-out subjects' whole
preprocessed scans (or on ``--image``/``--mask``, preprocessed as ``predict`` does), each
setting runs :func:`mlssp_jax.inference.predict_volume` (Gaussian weighting, brain windows
only, the fold's post-processing). A setting is ``WINDOW:OVERLAP`` (``VOI``: the training
VOI), ``WINDOW:OVERLAP@SHIFT`` (the window grid moved by SHIFT voxels: how much the result
depends on where the windows fall, never a candidate) or ``box`` (the brain's bounding box
in one cubic window, its edge rounded up to a multiple of 16). Each is compared with the
first setting, the reference (default: the training VOI at overlap 0.5): the mask's DSC
against the reference mask (worst subject and mean), max and mean |probability difference|
inside the brain, the mean DSC against the true mask, network voxel-evaluations and FLOPs
(XLA's count of the network per voxel with native convolutions, the same for every window
size: all layers are 'SAME' convolutions) and seconds. A batch holds about
``--batch-voxels`` voxels (``inference.auto_batch``). The last line is the verdict: the
cheapest setting within the tolerance: worst-subject DSC vs the reference >= ``--min-dsc``
(default: the placement floor, the lowest worst-subject DSC of the ``@SHIFT`` settings,
i.e. as close to the reference as the reference's own window grid moved by a few voxels;
0.99 without them) and mean DSC vs truth at most ``--max-truth-drop`` below the
reference's. A ``kernel check`` line compares the oneDNN and XLA-native convolutions on one
window of the largest size (a kernel bug at sizes other than the training VOI would show).

Re-run it for any run directory (e.g. after a model change such as per-window
normalisation, whose statistics make the result depend on the window).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from mlssp_jax import (  # noqa: E402
    ensemble,
    inference,
    manifest,
    metrics,
    nifti,
    patches,
    postprocess,
    predict,
    preprocess,
    rundir,
    wholescan,
)
from mlssp_jax.ops import cpu_env  # noqa: E402

DEFAULT_SETTINGS = ["VOI:0.5", "VOI:0.5@8", "VOI:0.25", "48:0.25", "48:0.5", "64:0.25",
                    "64:0.5", "96:0.25", "96:0.5", "box"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--fold", type=int, default=None)
    parser.add_argument("--image", type=Path, default=None, help="a scan instead of the fold's")
    parser.add_argument("--mask", type=Path, default=None, help="its true mask")
    parser.add_argument("--settings", nargs="+", default=None,
                        help="WINDOW:OVERLAP[@SHIFT] or box; the first is the reference "
                             f"(default: {' '.join(DEFAULT_SETTINGS)})")
    parser.add_argument("--subjects", type=int, default=0, help="at most N subjects (0: all)")
    parser.add_argument("--batch-voxels", type=int, default=inference.BATCH_VOXELS)
    parser.add_argument("--min-dsc", type=float, default=None,
                        help="default: the @SHIFT settings' worst DSC vs the reference, else "
                             "0.99")
    parser.add_argument("--max-truth-drop", type=float, default=0.005)
    parser.add_argument("--json", default="", help="also write benchmarks/results/NAME.json")
    return parser.parse_args(argv)


def held_out_volumes(workdir: Path, cfg, fold: int, limit: int) -> list[dict]:
    """The fold's test subjects' preprocessed volumes (:func:`patches.load_volumes`)."""
    manifest_path = preprocess.resolve_data(cfg.data)
    subjects = manifest.read_manifest(manifest_path, require_masks=True)
    paths = preprocess.cached_cohort(manifest_path, cfg.data, 1, subjects=subjects)
    split = json.loads((workdir / "splits.json").read_text())["folds"][fold]
    ids = split["test"][:limit or None]
    return patches.load_volumes(paths, ids, {s.subject_id: s.label for s in subjects})


def scan_volume(image_path: Path, mask_path: Path | None, cfg) -> list[dict]:
    """One scan preprocessed as ``predict`` does (its true mask, if given, alongside)."""
    image = nifti.load_image(image_path)
    mask = nifti.load_mask(mask_path, like=image) if mask_path else None
    pre = preprocess.preprocess_volume(image, mask, cfg.data)
    truth = pre.get("mask")
    return [{"subject_id": image_path.name, "image": pre["image"], "brain": pre["brain"],
             "hu": pre.get("hu"),
             "mask": np.zeros_like(pre["brain"]) if truth is None else truth,
             "spacing_mm": cfg.data.spacing_mm}]


def parse_setting(text: str, voi: int, volume: dict) -> tuple[int, float, int]:
    """``WINDOW:OVERLAP[@SHIFT]`` (``VOI`` = the training VOI) or ``box`` -> (window,
    overlap, shift in voxels of the window grid)."""
    if text == "box":
        box = inference.brain_box(volume["brain"], 16)
        edge = max(s.stop - s.start for s in box)
        return -(-edge // 16) * 16, 0.0, 0
    text, _, shift = text.partition("@")
    window, overlap = text.split(":")
    return (voi if window == "VOI" else int(window)), float(overlap), int(shift or 0)


def shifted_predict(volume: dict, model: ensemble.Ensemble, window: int, overlap: float,
                    batch: int, shift: int) -> np.ndarray:
    """:func:`inference.predict_volume` with the window grid moved by ``shift`` voxels along
    every axis (the brain box starts ``shift`` voxels earlier, zero-padded): how much the
    result depends on where the windows fall."""
    box = inference.brain_box(volume["brain"], window)
    pad = [(shift, 0)] * 3
    image, brain = np.pad(volume["image"], pad), np.pad(volume["brain"], pad)
    grown = tuple(slice(b.start, b.stop + shift) for b in box)  # padded coordinates
    prob = np.zeros(image.shape, np.float32)
    prob[grown] = inference.sliding_window_predict(image[grown], model.windows, window,
                                                   overlap, batch, brain=brain[grown])
    return prob[shift:, shift:, shift:]


def run_setting(volume: dict, model: ensemble.Ensemble, window: int, overlap: float,
                shift: int, batch_voxels: int) -> dict:
    """Probability, window count, batch and seconds of one volume at one setting."""
    batch = inference.auto_batch(window, batch_voxels)
    start = time.perf_counter()
    if shift:
        prob = shifted_predict(volume, model, window, overlap, batch, shift)
    else:
        prob = inference.predict_volume(volume["image"], volume["brain"], model, window,
                                        overlap, batch)
    seconds = time.perf_counter() - start
    count = inference.window_count(volume["brain"], window, overlap)
    return {"prob": prob, "windows": count, "batch": batch, "seconds": seconds,
            "voxel_evals": -(-count // batch) * batch * window**3}


def flops_per_voxel(model: ensemble.Ensemble, size: int) -> float:
    """XLA's FLOPs of the segmentation network per input voxel (native convolutions)."""
    xla = ensemble.make_ensemble(dataclasses.replace(model.model_cfg, conv_impl="xla"),
                                 model.params[:1])
    return common.compiled_flops(xla.lower_windows(1, size).compile()) / size**3


def kernel_check(model: ensemble.Ensemble, volume: dict, window: int) -> float:
    """Max |p_onednn - p_xla| on the ``window``^3 window at the centre of the brain box."""
    box = inference.brain_box(volume["brain"], window)
    starts = [max(0, min(b.start + (b.stop - b.start - window) // 2, n - window))
              for b, n in zip(box, volume["image"].shape, strict=True)]
    crop = volume["image"][tuple(slice(a, a + window) for a in starts)]
    batch = np.zeros((1,) + (window,) * 3 + (1,), np.float32)
    batch[0, :crop.shape[0], :crop.shape[1], :crop.shape[2], 0] = crop
    xla = ensemble.make_ensemble(dataclasses.replace(model.model_cfg, conv_impl="xla"),
                                 model.params)
    return float(np.abs(model.windows(batch)["seg_prob"] - xla.windows(batch)["seg_prob"]).max())


def compare(volumes: list[dict], results: list[dict], rule: dict, threshold: float) -> dict:
    """One row: the setting's agreement with the reference (``results[i]["ref"]``)."""
    dsc_ref, dsc_truth, dmax, dmean = [], [], [], []
    for volume, res in zip(volumes, results, strict=True):
        vox_ml = wholescan.voxel_ml(volume["spacing_mm"])
        hu = volume.get("hu")
        mask = postprocess.apply(metrics.binarize(res["prob"], threshold), volume["brain"],
                                 rule, vox_ml, hu=hu)
        ref = postprocess.apply(metrics.binarize(res["ref"], threshold), volume["brain"],
                                rule, vox_ml, hu=hu)
        dsc_ref.append(wholescan.dsc(mask, ref))
        dsc_truth.append(wholescan.dsc(mask, volume["mask"].astype(bool)))
        diff = np.abs(res["prob"] - res["ref"])[volume["brain"].astype(bool)]
        dmax.append(float(diff.max()))
        dmean.append(float(diff.mean()))
    return {"dsc_ref_min": min(dsc_ref), "dsc_ref_mean": float(np.mean(dsc_ref)),
            "max_diff": max(dmax), "mean_diff": float(np.mean(dmean)),
            "dsc_truth": float(np.mean(dsc_truth)),
            "windows": sum(r["windows"] for r in results),
            "voxel_evals": sum(r["voxel_evals"] for r in results),
            "seconds": sum(r["seconds"] for r in results),
            "batch": results[0]["batch"]}


def verdict(rows: list[dict], min_dsc: float | None, max_drop: float) -> str:
    """The cheapest setting within the tolerance, as one line."""
    ref = rows[0]
    floor = [r["dsc_ref_min"] for r in rows if "@" in r["setting"]]
    if min_dsc is None:
        min_dsc = min(floor) if floor else 0.99
    ok = [r for r in rows if "@" not in r["setting"] and r["dsc_ref_min"] >= min_dsc
          and r["dsc_truth"] >= ref["dsc_truth"] - max_drop]
    best = min(ok, key=lambda r: r["voxel_evals"])
    failed = [r["setting"] for r in rows if r not in ok and "@" not in r["setting"]]
    source = " (the placement floor)" if floor and min_dsc == min(floor) else ""
    return (f"verdict: cheapest within tolerance (worst DSC vs {ref['setting']} >= "
            f"{min_dsc:.4f}{source}, "
            f"mean DSC vs truth >= {ref['dsc_truth'] - max_drop:.3f}): {best['setting']} "
            f"(window {best['window']}, overlap {best['overlap']}), "
            f"{best['voxel_evals'] / ref['voxel_evals']:.1%} of the reference's FLOPs; "
            f"outside the tolerance: {', '.join(failed) or 'none'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpu_env.prepare_process()
    predict.use_compilation_cache()
    cfg = rundir.read_config(args.workdir)
    fold = args.fold if args.fold is not None else rundir.finished_folds(
        args.workdir, cfg.train.num_folds)[0]
    _, _, model = predict.load_ensemble(args.workdir, fold)
    volumes = (scan_volume(args.image, args.mask, cfg) if args.image
               else held_out_volumes(args.workdir, cfg, fold, args.subjects))
    rule = postprocess.ensemble_rule(args.workdir, [fold])[0]  # threshold: the config's
    voi = cfg.data.voi_size
    texts = args.settings or DEFAULT_SETTINGS
    per_voxel = flops_per_voxel(model, voi)
    rows, refs = [], None
    for text in texts:
        results = []
        for volume in volumes:
            window, overlap, shift = parse_setting(text, voi, volume)
            results.append(run_setting(volume, model, window, overlap, shift,
                                       args.batch_voxels))
        refs = refs or [r["prob"] for r in results]
        for res, ref in zip(results, refs, strict=True):
            res["ref"] = ref
        row = {"setting": text, "window": window, "overlap": overlap,
               **compare(volumes, results, rule, cfg.train.threshold)}
        row["tflop"] = row["voxel_evals"] * per_voxel / 1e12
        rows.append(row)
        print(f"{text}: {row}", flush=True)
    print(f"\n{args.workdir} fold {fold}, {len(volumes)} scans "
          f"({', '.join(v['subject_id'] for v in volumes)}); model {cfg.model.name} width "
          f"{cfg.model.width} norm {getattr(cfg.model, 'norm', 'none')}; post-processing "
          f"{rule}; {per_voxel / 1e3:.1f} kFLOP per voxel-evaluation")
    print(common.markdown_table(rows, [
        ("setting", "setting", "s"), ("window", "window", "d"), ("overlap", "overlap", ".2f"),
        ("batch", "batch", "d"), ("windows", "windows", "d"),
        ("dsc_ref_min", "worst DSC vs ref", ".4f"), ("dsc_ref_mean", "mean DSC vs ref", ".4f"),
        ("max_diff", "max |dp| brain", ".4f"), ("mean_diff", "mean |dp| brain", ".5f"),
        ("dsc_truth", "DSC vs truth", ".4f"), ("tflop", "TFLOP", ".3f"),
        ("seconds", "s", ".2f")]))
    largest = max(r["window"] for r in rows)
    check = kernel_check(model, volumes[0], largest)
    print(f"kernel check: max |p_onednn - p_xla| on one {largest}^3 window of "
          f"{volumes[0]['subject_id']}: {check:.1e}")
    if args.json:
        common.write_result(args.json, {"args": {k: str(v) for k, v in vars(args).items()},
                                        "fold": fold, "rows": rows, "kernel_check": check})
    print(verdict(rows, args.min_dsc, args.max_truth_drop))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
