"""Per-layer forward+backward time of the network's convolutions: XLA native vs our CPU paths.

For each layer shape of the MLSSP network (width ``w``, VOI ``S``): the 3x3x3 convs at each
level, the 2x2x2 down and up convs. Each timed call is one forward and both backward passes
(input and kernel gradients; the 1-channel stem only the kernel gradient, as in training).
Implementations are timed interleaved in one process (XLA native, ``conv_ops`` ``"cpu"`` and,
if it can run here, ``"onednn"``, and PyTorch NCDHW / channels_last_3d if torch is
installed), medians of ``--repeats``.

    python benchmarks/conv_layers.py --width 16 --size 64 --batch 2 --repeats 5

Prints a markdown table of ms per call; ``--json NAME`` also writes benchmarks/results/NAME.json.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import common
import jax
import jax.numpy as jnp
import numpy as np

from mlssp_jax.ops import conv_ops, cpu_env, onednn


def layer_shapes(width: int, size: int) -> list[dict]:
    """The network's conv layers: name, op kind, Cin, Cout, input spatial size."""
    w, s = width, size
    rows = [("conv", 1, w, s), ("conv", w, w, s), ("conv", 2 * w, w, s), ("conv", w, 2 * w, s),
            ("conv", 2 * w, 2 * w, s // 2), ("conv", 4 * w, 4 * w, s // 4),
            ("conv", 8 * w, 8 * w, s // 8), ("conv", 16 * w, 16 * w, s // 16),
            ("down", w, w, s), ("down", 2 * w, 2 * w, s // 2),
            ("up", 2 * w, w, s // 2), ("up", 16 * w, 8 * w, s // 16)]
    return [{"layer": f"{kind} {ci}->{co} @{n}", "kind": kind, "cin": ci, "cout": co, "size": n}
            for kind, ci, co, n in rows]


def _jax_op(kind: str) -> Callable:
    return {"conv": conv_ops.conv3d, "down": conv_ops.down_conv, "up": conv_ops.up_conv}[kind]


def jax_runner(spec: dict, batch: int, impl: str) -> Callable[[], object]:
    """A closure running one jitted forward + backward of the layer with ``impl``."""
    op, ks = _jax_op(spec["kind"]), (3 if spec["kind"] == "conv" else 2)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, *(spec["size"],) * 3, spec["cin"])), jnp.float32)
    k = jnp.asarray(rng.normal(size=(ks,) * 3 + (spec["cin"], spec["cout"])), jnp.float32)
    y_shape = jax.eval_shape(lambda x, k: op(x, k, "xla"), x, k).shape
    g = jnp.asarray(rng.normal(size=y_shape), jnp.float32)
    stem = spec["cin"] == 1

    @jax.jit
    def fwd_bwd(x, k, g):
        # The output is returned too: else XLA drops the forward pass as dead code.
        if stem:
            y, vjp = jax.vjp(lambda k: op(x, k, impl), k)
        else:
            y, vjp = jax.vjp(lambda x, k: op(x, k, impl), x, k)
        return y, vjp(g)

    return lambda: jax.block_until_ready(fwd_bwd(x, k, g))


def torch_runner(spec: dict, batch: int, channels_last: bool) -> Callable[[], object]:
    """The same layer in PyTorch (NCDHW or channels_last_3d), forward + autograd backward."""
    import torch
    import torch.nn.functional as F

    ks = 3 if spec["kind"] == "conv" else 2
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = torch.randn(batch, spec["cin"], *(spec["size"],) * 3).to(memory_format=fmt)
    shape = (spec["cin"], spec["cout"]) if spec["kind"] == "up" else (spec["cout"], spec["cin"])
    w = torch.randn(*shape, ks, ks, ks).to(memory_format=fmt).requires_grad_(True)
    x.requires_grad_(spec["cin"] != 1)
    op = {"conv": lambda x, w: F.conv3d(x, w, padding=1),
          "down": lambda x, w: F.conv3d(x, w, stride=2),
          "up": lambda x, w: F.conv_transpose3d(x, w, stride=2)}[spec["kind"]]
    g = torch.randn_like(op(x, w).detach())
    inputs = [x, w] if x.requires_grad else [w]
    return lambda: torch.autograd.grad(op(x, w), inputs, g)


def runners(spec: dict, batch: int, with_torch: bool) -> dict[str, Callable[[], object]]:
    out = {"xla_ms": jax_runner(spec, batch, "xla"), "cpu_ms": jax_runner(spec, batch, "cpu")}
    if onednn.available():
        out["onednn_ms"] = jax_runner(spec, batch, "onednn")
    if with_torch:
        out["torch_ncdhw_ms"] = torch_runner(spec, batch, channels_last=False)
        out["torch_cl3d_ms"] = torch_runner(spec, batch, channels_last=True)
    return out


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms per call of each function, called in turn ``repeats`` times after a warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: float(np.median(t)) for name, t in times.items()}


def torch_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    torch.set_num_threads(os.cpu_count() or 1)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", default="", help="comma-separated substrings to select")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", default="", help="also write benchmarks/results/NAME.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpu_env.prepare_process()  # GLIBC_TUNABLES for both frameworks (MLSSP_JAX_NO_CPU_TUNING=1: off)
    with_torch = not args.no_torch and torch_available()
    rows = []
    for spec in layer_shapes(args.width, args.size):
        if args.layers and not any(s in spec["layer"] for s in args.layers.split(",")):
            continue
        row = {**spec, **time_interleaved(runners(spec, args.batch, with_torch), args.repeats)}
        if with_torch:
            row["torch_best_ms"] = min(row["torch_ncdhw_ms"], row["torch_cl3d_ms"])
            row["cpu_over_torch"] = row["cpu_ms"] / row["torch_best_ms"]
            if "onednn_ms" in row:
                row["onednn_over_torch"] = row["onednn_ms"] / row["torch_best_ms"]
        row["xla_over_cpu"] = row["xla_ms"] / row["cpu_ms"]
        rows.append(row)
        print(common.markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
    print(f"\nbatch {args.batch}, fwd+bwd ms, medians of {args.repeats}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    print(common.markdown_table(rows, COLUMNS))
    if args.json:
        common.write_result(args.json, {"args": vars(args), "rows": rows})
    return 0


COLUMNS = [("layer", "layer", "s"), ("xla_ms", "XLA native", ".1f"), ("cpu_ms", "cpu path", ".1f"),
           ("onednn_ms", "onednn", ".1f"), ("torch_ncdhw_ms", "torch NCDHW", ".1f"),
           ("torch_cl3d_ms", "torch CL3D", ".1f"), ("xla_over_cpu", "XLA/cpu", ".1f"),
           ("cpu_over_torch", "cpu/torch best", ".2f"),
           ("onednn_over_torch", "onednn/torch best", ".2f")]

if __name__ == "__main__":
    raise SystemExit(main())
