"""The AVX-512 kernels for convolutions to eight channels against oneDNN's primitives.

Each layer of a width-8 U-Net that ``csrc/direct_conv.cc`` takes over, at inference size
(a batch of ``--batch`` 32^3 windows): the 3x3x3 conv + bias + ReLU from 1 (stem), 8 and 16
(decoder, after the skip concatenation) channels to 8, and the 2x2x2 stride-2 up conv from
16 to 8 channels; plus one 16-channel layer both run on oneDNN (the control: its ratio
should be ~1). Each layer is compiled twice in one process, with ``$MLSSP_JAX_DIRECT_CONV``
at 1 and at 0 when it is lowered, timed interleaved; ``rel L2`` is each result against
XLA's own convolution.

    python benchmarks/direct_conv.py [--batch 4] [--repeats 40] [--json NAME]
"""

from __future__ import annotations

import argparse
import functools
import os

import common
import jax
import jax.numpy as jnp
import numpy as np

from mlssp_jax.ops import conv_ops, cpu_env, onednn

DIMS = ("NDHWC", "DHWIO", "NDHWC")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--json", default="", help="also write benchmarks/results/NAME.json")
    return parser.parse_args(argv)


def layers(batch: int) -> dict:
    """name -> (op(x, kernel, bias), x, kernel, bias, XLA's result)."""
    rng = np.random.default_rng(0)

    def conv(size, cin, cout):
        x = jnp.asarray(rng.normal(size=(batch, size, size, size, cin)), jnp.float32)
        kernel = jnp.asarray(rng.normal(size=(3, 3, 3, cin, cout)) / np.sqrt(27 * cin),
                             jnp.float32)
        bias = jnp.linspace(-0.1, 0.1, cout, dtype=jnp.float32)
        expected = jax.nn.relu(jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME",
                                                            dimension_numbers=DIMS) + bias)
        return (lambda x, k, b: conv_ops.conv3d_bias_relu(x, k, b, "onednn")), x, kernel, bias, \
            expected

    def up(size, cin, cout):
        x = jnp.asarray(rng.normal(size=(batch, size, size, size, cin)), jnp.float32)
        kernel = jnp.asarray(rng.normal(size=(2, 2, 2, cin, cout)) / np.sqrt(cin), jnp.float32)
        expected = jax.lax.conv_transpose(x, kernel, (2, 2, 2), "SAME", dimension_numbers=DIMS)
        return (lambda x, k, b: conv_ops.up_conv(x, k, "onednn")), x, kernel, None, expected

    return {"stem 1->8 @32^3": conv(32, 1, 8), "8->8 @32^3": conv(32, 8, 8),
            "16->8 @32^3 (decoder)": conv(32, 16, 8), "up 16->8 @16^3->32^3": up(16, 16, 8),
            "control 16->16 @16^3": conv(16, 16, 16)}


def compiled(op, x, kernel, bias, direct: str):
    """``op`` compiled with the direct kernels on ("1") or off ("0")."""
    os.environ[onednn.DIRECT_CONV_VAR] = direct  # read when the call is traced
    jax.clear_caches()  # else the trace made under the other setting is reused
    return jax.jit(op).lower(x, kernel, bias).compile()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpu_env.prepare_process()
    if not onednn.available():
        raise SystemExit(f"error: oneDNN unavailable: {onednn.status().reason}")
    rows = []
    for name, (op, x, kernel, bias, expected) in layers(args.batch).items():
        calls = {direct: compiled(op, x, kernel, bias, direct) for direct in ("1", "0")}
        errors = {d: float(jnp.linalg.norm(f(x, kernel, bias) - expected)
                           / jnp.linalg.norm(expected)) for d, f in calls.items()}
        timed = common.time_interleaved({d: functools.partial(f, x, kernel, bias)
                                         for d, f in calls.items()}, args.repeats, 5)
        rows.append({"layer": name, "direct_ms": 1e3 * timed["1"]["median_s"],
                     "onednn_ms": 1e3 * timed["0"]["median_s"],
                     "speedup": timed["0"]["median_s"] / timed["1"]["median_s"],
                     "rel_direct": errors["1"], "rel_onednn": errors["0"]})
    os.environ.pop(onednn.DIRECT_CONV_VAR)
    print(f"batch {args.batch}; medians of {args.repeats} interleaved calls; "
          f"load {os.getloadavg()[0]:.1f}")
    print(common.markdown_table(rows, [
        ("layer", "layer", "s"), ("direct_ms", "direct ms", ".2f"),
        ("onednn_ms", "oneDNN ms", ".2f"), ("speedup", "oneDNN / direct", ".2f"),
        ("rel_direct", "rel L2 direct vs XLA", ".1e"),
        ("rel_onednn", "rel L2 oneDNN vs XLA", ".1e")]))
    if args.json:
        common.write_result(args.json, {"args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
