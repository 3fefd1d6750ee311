"""Whole-volume sliding-window inference: ours against MONAI's, same network, one process.

The network is the segmentation path (stem + 3D U-Net + sigmoid) of the MLSSP model; the
PyTorch twin is :class:`compare_torch.TorchMultiTaskNet` without its classification branch,
in channels_last_3d (its best format in ``compare_torch.py``), under ``torch.inference_mode``,
loaded with the JAX parameters (the outputs are compared, so both compute the same thing).
MONAI runs ``monai.inferers.sliding_window_inference(mode="gaussian")`` (sigma 1/8 of the
window, as ours) with the same window, overlap and batch of windows; the ensemble of
``--folds`` models is one predictor averaging the models on each batch of windows (MONAI has
no stacked ensemble). Ours is :func:`mlssp_jax.inference.sliding_window_predict` over
:class:`mlssp_jax.ensemble.Ensemble` (every fold on the device, mean there), once over every window
("ours all windows", the same work as MONAI) and once over the windows holding brain
("ours brain windows", what ``predict`` does). Input: the brain's bounding box of one
preprocessed scan (``--image``, else a generated full-size synthetic subject).

    python benchmarks/compare_inference.py --width 8 --window 32 --overlap 0.5 --batch 4 \
        --folds 1 --repeats 3 [--image SCAN.nii.gz] [--json NAME]

The calls are timed interleaved (MONAI, ours, ours, GEMM, MONAI, ...), medians reported;
a float32 2048^2 GEMM timed alongside is the CPU peak. FLOPs per scan: XLA's count of one
compiled batch of windows with native convolutions x the number of batches. The last line
is ``ratio X``: ours (brain windows) volumes/s over MONAI's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path

import common
import compare_torch
import numpy as np
import torch
from monai.inferers import sliding_window_inference

from mlssp_jax import config as config_lib
from mlssp_jax import ensemble, inference, models, nifti, preprocess
from mlssp_jax.ops import cpu_env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=4, help="windows per batch")
    parser.add_argument("--folds", type=int, default=1, help="models in the ensemble")
    parser.add_argument("--image", type=Path, default=None, help="a NIfTI head CT")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", default="", help="also write benchmarks/results/NAME.json")
    return parser.parse_args(argv)


def brain_crop(image_path: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """(volume, brain) of the brain's bounding box of one preprocessed scan, (D, H, W)."""
    if image_path is None:
        from mlssp_jax.synth import generate_cohort

        with tempfile.TemporaryDirectory() as tmp:
            generate_cohort(Path(tmp), n_subjects=2, n_avm=1, seed=0, small=False)  # 2: the minimum
            return brain_crop(Path(tmp) / "images" / "sub-001.nii.gz")
    pre = preprocess.preprocess_volume(nifti.load_image(image_path), None,
                                       config_lib.DataConfig())
    box = inference.brain_box(pre["brain"], 16)
    return pre["image"][box], pre["brain"][box].astype(bool)


def torch_twin(model_cfg: config_lib.ModelConfig, params: dict) -> torch.nn.Module:
    """The PyTorch segmentation network carrying ``params`` (flax tree), channels_last_3d."""
    net = compare_torch.TorchMultiTaskNet(models.build_model(model_cfg).clone(cls=False))
    p = params

    def conv(module, leaf, transpose=False):
        kernel = np.asarray(leaf["kernel"])  # (kd, kh, kw, I, O)
        if transpose:  # flax ConvTranspose: out[2i + a] = x[i] k[1 - a]; torch: w[a]
            weight = kernel[::-1, ::-1, ::-1].transpose(3, 4, 0, 1, 2)
        else:
            weight = kernel.transpose(4, 3, 0, 1, 2)
        module.weight.data = torch.from_numpy(np.ascontiguousarray(weight))
        module.bias.data = torch.from_numpy(np.array(leaf["bias"]))

    def block(seq, leaf):
        conv(seq[0], leaf["conv0"])
        conv(seq[2], leaf["conv1"])

    block(net.stem, p["stem"])
    unet = p["unet"]
    for k in range(models.LEVELS):
        block(net.unet.enc[k], unet[f"enc{k + 1}"]["block"])
        conv(net.unet.down[k], unet[f"enc{k + 1}"]["down"])
        block(net.unet.dec[k], unet[f"dec{k + 1}"]["block"])
        conv(net.unet.up[k], unet[f"dec{k + 1}"]["up"], transpose=True)
    block(net.unet.bottom, unet["bottom"])
    conv(net.unet.seg_out, unet["seg_out"])
    return net.eval().to(memory_format=torch.channels_last_3d)


def twin_difference(model: ensemble.Ensemble, nets: list[torch.nn.Module],
                    args: argparse.Namespace) -> float:
    """Max |p_ours - p_torch| on one random batch of windows: the twin computes the same."""
    x = np.random.default_rng(0).random((args.batch,) + (args.window,) * 3 + (1,), np.float32)
    ours = np.asarray(model.windows(x)["seg_prob"])[..., 0]
    windows = torch.from_numpy(x[..., 0].copy())[:, None]
    with torch.inference_mode():
        theirs = sum(torch.sigmoid(net(windows.contiguous(memory_format=torch.channels_last_3d))
                                   [0])[:, 0] for net in nets) / len(nets)
    return float(np.abs(ours - theirs.numpy()).max())


def monai_call(nets: list[torch.nn.Module], volume: np.ndarray, args: argparse.Namespace):
    """A zero-argument MONAI sliding-window inference of ``volume``; returns (D, H, W)."""
    image = torch.from_numpy(np.ascontiguousarray(volume))[None, None]

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        windows = windows.contiguous(memory_format=torch.channels_last_3d)
        return sum(torch.sigmoid(net(windows)[0]) for net in nets) / len(nets)

    def call() -> np.ndarray:
        with torch.inference_mode():
            out = sliding_window_inference(image, (args.window,) * 3, args.batch, predictor,
                                           overlap=args.overlap, mode="gaussian",
                                           sigma_scale=0.125, padding_mode="constant")
        return out[0, 0].numpy()

    return call


def ours_call(model: ensemble.Ensemble, volume: np.ndarray, brain: np.ndarray | None,
              args: argparse.Namespace):
    def call() -> np.ndarray:
        return inference.sliding_window_predict(volume, model.windows, args.window,
                                                args.overlap, args.batch, brain=brain)
    return call


def batch_flops(model_cfg: config_lib.ModelConfig, params: list,
                args: argparse.Namespace) -> float:
    """XLA's FLOPs of one batched windows call with native convolutions (every fold)."""
    xla_cfg = dataclasses.replace(model_cfg, conv_impl="xla")
    xla_model = ensemble.make_ensemble(xla_cfg, params)
    flops = common.compiled_flops(xla_model.lower_windows(args.batch, args.window).compile())
    return flops * xla_model.folds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpu_env.prepare_process()  # GLIBC_TUNABLES for both frameworks (MLSSP_JAX_NO_CPU_TUNING=1: off)
    torch.set_num_threads(os.cpu_count() or 1)
    model_cfg = config_lib.ModelConfig(name="unet3d", width=args.width)
    net = models.build_model(model_cfg)
    params = [models.init_params(net, 16, seed) for seed in range(args.folds)]
    volume, brain = brain_crop(args.image)
    model = ensemble.make_ensemble(model_cfg, params)
    nets = [torch_twin(model_cfg, p) for p in params]
    twin = twin_difference(model, nets, args)
    calls = {"monai": monai_call(nets, volume, args),
             "ours all windows": ours_call(model, volume, None, args),
             "ours brain windows": ours_call(model, volume, brain, args)}
    outputs = {name: call() for name, call in calls.items()}  # also compiles ours
    gemm, gemm_flops = common.gemm_call(2048)
    timed = common.time_interleaved({**calls, "gemm": gemm}, args.repeats, args.warmup)
    peak = gemm_flops / timed["gemm"]["min_s"]
    windows = {"monai": None, "ours all windows": None, "ours brain windows": brain}
    per_batch = batch_flops(model_cfg, params, args)
    rows = []
    for name in calls:
        count = len(inference.window_starts(volume.shape, args.window, args.overlap,
                                            windows[name]))
        batches = -(-count // args.batch)
        flops = per_batch * batches
        stats = timed[name]
        diff = np.abs(outputs[name] - outputs["monai"])[brain]
        rows.append({"name": name, "s": stats["median_s"], "iqr": stats["iqr_s"],
                     "vps": 1.0 / stats["median_s"], "windows": count, "gflop": flops / 1e9,
                     "peak": flops / stats["median_s"] / peak, "max_diff": float(diff.max())})
    print(f"volume {volume.shape} (brain box), {int(brain.sum())} brain voxels; width "
          f"{args.width}, window {args.window}^3, overlap {args.overlap}, batch {args.batch}, "
          f"folds {args.folds}; threads {torch.get_num_threads()}; load {os.getloadavg()[0]:.1f}")
    print(common.markdown_table(rows, [
        ("name", "implementation", "s"), ("s", "s/volume (median)", ".3f"),
        ("iqr", "IQR s", ".3f"), ("vps", "volumes/s", ".3f"), ("windows", "windows", "d"),
        ("gflop", "GFLOP/volume (XLA)", ".1f"), ("peak", "of GEMM peak", ".1%"),
        ("max_diff", "max |p - p_monai| in brain", ".1e")]))
    print(f"\ntwin check: max |p_ours - p_torch| on one batch of windows {twin:.1e}; in the "
          f"volume the two differ by where the windows are (MONAI: stride window x (1 - "
          f"overlap), last window clamped to the border; ours: nnU-Net's evenly spread starts)")
    print(f"fp32 GEMM peak (jitted 2048^2 matmul, fastest interleaved call): "
          f"{peak / 1e9:.1f} GFLOP/s")
    if args.json:
        common.write_result(args.json, {"args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": rows, "timed": timed})
    rates = {row["name"]: row["vps"] for row in rows}
    print(f"ratio all windows {rates['ours all windows'] / rates['monai']:.3f}")
    print(f"ratio {rates['ours brain windows'] / rates['monai']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
