"""The JAX train step side by side with the same network in PyTorch, on the CPU.

The PyTorch network mirrors :mod:`mlssp_jax.models` layer for layer (same parameter count,
checked), the loss is the same ``alpha * Dice + (1 - alpha) * BCE`` (one term for the
single-task variants), the optimiser Adam in both. PyTorch runs eager in NCDHW and
channels_last_3d (and ``torch.compile`` with ``--torch-compile``); its best is the
reference. Everything is warmed up and timed interleaved in this one process with the
same thread count, on the same synthetic batch; a float32 GEMM is timed alongside as the
peak for MFU. PyTorch is an optional benchmark dependency (``pip install -e .[bench]``).

    python benchmarks/compare_torch.py --model mlssp --width 16 --size 64 --batch 2 \
        --impl auto,xla --repeats 5 [--layers]

``--impl`` lists JAX conv implementations (config ``model.conv_impl``); the first one is
the one in the ratio. The last line printed is ``ratio R``, R = JAX volumes/s / best
PyTorch volumes/s. All implementations share this process's ``XLA_FLAGS``, which
:mod:`mlssp_jax.ops.cpu_env` sets for the 2-D formulations only when oneDNN cannot run; to time
``--impl cpu`` as it runs when it is the fallback, set them yourself:
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_dot,eltwise,reduce``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import common
import jax
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlssp_jax import config as config_lib
from mlssp_jax import models, parallel, train_step
from mlssp_jax.ops import cpu_env

GEMM_N = 2048


# ------------------------------------------------------------------------ PyTorch network


class ConvBlock(nn.Sequential):
    """Two 3x3x3 conv + ReLU (NCDHW)."""

    def __init__(self, cin: int, features: int):
        super().__init__(nn.Conv3d(cin, features, 3, padding=1), nn.ReLU(),
                         nn.Conv3d(features, features, 3, padding=1), nn.ReLU())


class TorchUNet(nn.Module):
    """The 3D U-Net of :class:`mlssp_jax.models.UNet`: returns (logits, taps)."""

    def __init__(self, width: int, levels: int = models.LEVELS):
        super().__init__()
        feats = [width * 2**k for k in range(levels)]  # per level, top first
        cins = [width, *feats[:-1]]
        self.enc = nn.ModuleList(ConvBlock(ci, f) for ci, f in zip(cins, feats, strict=True))
        self.down = nn.ModuleList(nn.Conv3d(f, f, 2, stride=2) for f in feats)
        self.bottom = ConvBlock(feats[-1], width * 2**levels)
        ups_in = [width * 2 ** (k + 1) for k in range(levels)]
        self.up = nn.ModuleList(nn.ConvTranspose3d(ci, f, 2, stride=2)
                                for ci, f in zip(ups_in, feats, strict=True))
        self.dec = nn.ModuleList(ConvBlock(2 * f, f) for f in feats)
        self.seg_out = nn.Conv3d(width, 1, 1)

    def forward(self, x):
        taps, skips = [x], []
        for enc, down in zip(self.enc, self.down, strict=True):
            skips.append(enc(x))
            x = down(skips[-1])
            taps.append(x)
        x = self.bottom(x)
        for k in reversed(range(len(self.dec))):
            x = self.dec[k](torch.cat([self.up[k](x), skips[k]], dim=1))
        taps.append(x)
        return self.seg_out(x), taps


class TorchClassifier(nn.Module):
    """Two conv + ReLU + 'SAME' max-pool blocks, global average pool, 3 dense layers."""

    def __init__(self, cin: int, width: int, dense_units: int):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv3d(cin, 2 * width, 3, padding=1),
                                    nn.Conv3d(2 * width, 4 * width, 3, padding=1)])
        self.dense = nn.Sequential(nn.Linear(4 * width, dense_units), nn.ReLU(),
                                   nn.Linear(dense_units, dense_units), nn.ReLU(),
                                   nn.Linear(dense_units, 1))

    def forward(self, x):
        for conv in self.convs:
            x = F.max_pool3d(F.relu(conv(x)), 2, 2, ceil_mode=True)
        return self.dense(x.mean(dim=(2, 3, 4)))[:, 0]


class TorchMultiTaskNet(nn.Module):
    """The variant of :class:`mlssp_jax.models.MultiTaskNet` described by ``net``."""

    def __init__(self, net: models.MultiTaskNet):
        super().__init__()
        self.stem = ConvBlock(1, net.width)
        self.unet = TorchUNet(net.width) if net.seg else None
        self.share_depth = net.share_depth
        self.cls_head = None
        if net.cls:
            cin = _tap_channels(net.width, net.share_depth)
            self.cls_head = TorchClassifier(cin, net.width, net.dense_units)

    def forward(self, x):
        h = self.stem(x)
        seg, taps = self.unet(h) if self.unet is not None else (None, [h])
        cls = self.cls_head(taps[self.share_depth]) if self.cls_head is not None else None
        return seg, cls


def _tap_channels(width: int, share_depth: int) -> int:
    """Channels of ``taps[share_depth]``: stem (0), encoder level k's down output, decoder."""
    if share_depth in (0, models.DECODER):
        return width
    return width * 2 ** (share_depth - 1)


def torch_loss(seg, cls, mask, label, alpha: float):
    """alpha * Dice(eps=1) + (1 - alpha) * BCE, batch means; one term for one-task models."""
    parts = []
    if seg is not None:
        p = torch.sigmoid(seg)
        overlap = (p * mask).sum(dim=(1, 2, 3, 4))
        total = p.sum(dim=(1, 2, 3, 4)) + mask.sum(dim=(1, 2, 3, 4))
        parts.append(1.0 - (2.0 * overlap + 1.0) / (total + 1.0))
    if cls is not None:
        parts.append(F.binary_cross_entropy_with_logits(cls, label, reduction="none"))
    if len(parts) == 1:
        return parts[0].mean()
    return alpha * parts[0].mean() + (1.0 - alpha) * parts[1].mean()


def torch_step_runner(config: config_lib.Config, batch: dict, fmt: str):
    """A zero-argument PyTorch train step (forward, loss, backward, Adam) in memory ``fmt``."""
    net = models.build_model(config.model)
    model = TorchMultiTaskNet(net)
    memory = torch.channels_last_3d if fmt == "cl3d" else torch.contiguous_format
    model = model.to(memory_format=memory)
    opt = torch.optim.Adam(model.parameters(), lr=config.train.learning_rate,
                           betas=(config.train.adam_b1, config.train.adam_b2))
    image, mask = (torch.from_numpy(batch[k].transpose(0, 4, 1, 2, 3).copy())
                   .to(memory_format=memory) for k in ("image", "mask"))
    label = torch.from_numpy(batch["label"].copy())
    forward = torch.compile(model) if fmt == "compile" else model

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        seg, cls = forward(image)
        loss = torch_loss(seg, cls, mask, label, float(config.train.alpha))
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step, sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------ JAX side


def make_config(args: argparse.Namespace, impl: str) -> config_lib.Config:
    """Default config with the benchmark's model, width, size, batch, alpha and conv impl."""
    base = config_lib.Config()
    config = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, name=args.model, width=args.width, conv_impl=impl),
        data=dataclasses.replace(base.data, voi_size=args.size),
        train=dataclasses.replace(base.train, batch_size=args.batch, alpha=args.alpha))
    config_lib.validate(config, "compare_torch flags")
    return config


def synthetic_batch(batch: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """image (B,S,S,S,1) uniform [0, 1), a centred ball mask, labels alternating 0/1."""
    rng = np.random.default_rng(seed)
    image = rng.random((batch, size, size, size, 1), dtype=np.float32)
    grid = np.indices((size,) * 3).transpose(1, 2, 3, 0) - size / 2
    ball = (np.linalg.norm(grid, axis=-1) < size / 6).astype(np.float32)
    mask = np.broadcast_to(ball[None, ..., None], image.shape).copy()
    return {"image": image, "mask": mask, "label": (np.arange(batch) % 2).astype(np.float32)}


def jax_step_runner(config: config_lib.Config, batch: dict):
    """(zero-argument JAX train step carrying its donated state, compile s, params, FLOPs).

    FLOPs: one train step as XLA counts them for the native ("xla") conv graph, so every
    implementation is credited with the same work.
    """
    mesh = parallel.make_mesh()
    state = train_step.create_train_state(config, jax.random.key(0), mesh, steps_per_epoch=1)
    device_batch = parallel.shard_batch(batch, mesh)
    xla_config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, conv_impl="xla"))
    flops = common.compiled_flops(
        train_step.make_train_step(xla_config, mesh, steps_per_epoch=1).lower(state, device_batch))
    jitted = train_step.make_train_step(config, mesh, steps_per_epoch=1)
    compiled, compile_s = common.compile_timed(jitted, state, device_batch)
    holder = [state]

    def step():
        holder[0], metrics = compiled(holder[0], device_batch)
        return metrics["loss"]

    n_params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
    return step, compile_s, n_params, flops


# ------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mlssp", choices=config_lib.MODEL_NAMES)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--impl", default="auto",
                        help="comma-separated JAX conv impls (auto, onednn, cpu, xla); "
                             "the first is in the ratio")
    parser.add_argument("--formats", default="ncdhw,cl3d",
                        help="PyTorch variants: ncdhw, cl3d (channels_last_3d), compile")
    parser.add_argument("--layers", action="store_true", help="also print the per-layer table")
    parser.add_argument("--json", default="", help="also write benchmarks/results/NAME.json")
    return parser.parse_args(argv)


def build_runners(args: argparse.Namespace, batch: dict) -> tuple[dict, dict]:
    """Zero-argument step calls by name, and per-name info (compile s, parameter counts)."""
    calls, info = {}, {}
    for impl in args.impl.split(","):
        config = make_config(args, impl)
        calls[f"jax_{impl}"], compile_s, n_params, flops = jax_step_runner(config, batch)
        info[f"jax_{impl}"] = {"compile_s": compile_s, "params": n_params, "flops": flops}
    for fmt in args.formats.split(","):
        calls[f"torch_{fmt}"], n_params = torch_step_runner(config, batch, fmt)
        info[f"torch_{fmt}"] = {"params": n_params}
    gemm, gemm_flops = common.gemm_call(GEMM_N)
    calls["gemm"] = gemm
    info["gemm"] = {"flops": gemm_flops}
    return calls, info


def report(args, timed: dict, info: dict) -> dict[str, float]:
    """Print the step table; return volumes/s by name."""
    flops = info[f"jax_{args.impl.split(',')[0]}"]["flops"]
    # Fastest interleaved GEMM call, as throughput.py: under load the median one is depressed.
    peak = info["gemm"]["flops"] / timed["gemm"]["min_s"]
    rows, rates = [], {}
    for name, stats in timed.items():
        if name == "gemm":
            continue
        rates[name] = args.batch / stats["median_s"]
        mfu = flops / stats["median_s"] / peak if flops else None
        rows.append({"name": name, "s": stats["median_s"], "iqr": stats["iqr_s"],
                     "vps": rates[name], "mfu": mfu,
                     **{k: v for k, v in info[name].items() if k != "flops"}})
    print(common.markdown_table(rows, [
        ("name", "implementation", "s"), ("s", "s/step (median)", ".3f"), ("iqr", "IQR s", ".3f"),
        ("vps", "volumes/s", ".3f"), ("mfu", "MFU", ".1%"), ("params", "params", "d"),
        ("compile_s", "compile s", ".1f")]))
    print(f"\nfp32 GEMM peak (jitted {GEMM_N}^2 matmul, fastest interleaved call): "
          f"{peak / 1e9:.1f} GFLOP/s; "
          f"model FLOPs/step (XLA count, native graph): "
          f"{flops / 1e9 if flops else float('nan'):.1f} GFLOP")
    return rates


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpu_env.prepare_process()  # GLIBC_TUNABLES for both frameworks (MLSSP_JAX_NO_CPU_TUNING=1: off)
    torch.set_num_threads(os.cpu_count() or 1)
    batch = synthetic_batch(args.batch, args.size)
    calls, info = build_runners(args, batch)
    counts = {v["params"] for k, v in info.items() if "params" in v}
    if len(counts) != 1:
        raise SystemExit(f"parameter counts differ between JAX and PyTorch: {info}")
    print(f"{args.model} width {args.width}, {args.size}^3, batch {args.batch}, threads "
          f"{torch.get_num_threads()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}", flush=True)
    timed = common.time_interleaved(calls, args.repeats, args.warmup)
    rates = report(args, timed, info)
    if args.layers:
        import conv_layers

        conv_layers.main([f"--width={args.width}", f"--size={args.size}",
                          f"--batch={args.batch}", f"--repeats={args.repeats}"])
    if args.json:
        common.write_result(args.json, {"args": vars(args), "timed": timed, "info": info})
    jax_rate = rates[f"jax_{args.impl.split(',')[0]}"]
    torch_rate = max(v for k, v in rates.items() if k.startswith("torch_"))
    print(f"ratio {jax_rate / torch_rate:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
