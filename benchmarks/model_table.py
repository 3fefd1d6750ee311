"""Parameter count and XLA-counted FLOPs per forward pass of every model variant.

Compiles (never runs) ``model.apply`` for a batch of one ``S^3`` VOI with XLA's native
convolutions (``conv_impl="xla"``, so the count is that of the plain network, not of a CPU
reformulation) and reads ``compiled.cost_analysis()``. Parameters come from
``jax.eval_shape`` (nothing is initialised).

    python benchmarks/model_table.py --size 64 --widths 16 32

Prints a markdown table (for the README); ``--json NAME`` also writes
benchmarks/results/NAME.json.
"""

from __future__ import annotations

import argparse
import dataclasses

import common
import jax
import jax.numpy as jnp
import numpy as np

from mlssp_jax.config import MODEL_NAMES, ModelConfig
from mlssp_jax.models import build_model


def variant_stats(cfg: ModelConfig, size: int) -> dict:
    """{"params": count, "gflops": forward GFLOPs, "compile_s": seconds} at batch 1."""
    model = build_model(cfg)
    x = jax.ShapeDtypeStruct((1, size, size, size, 1), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables))
    compiled, compile_s = common.compile_timed(jax.jit(model.apply), variables, x)
    flops = common.compiled_flops(compiled)
    return {"params": n_params, "gflops": None if flops is None else flops / 1e9,
            "compile_s": compile_s, "share_depth": model.share_depth}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    rows, columns = [], [("model", "model", "s"), ("share_depth", "branch point", "s")]
    for name in MODEL_NAMES:
        row = {"model": name}
        for width in args.widths:
            cfg = dataclasses.replace(ModelConfig(), name=name, width=width, conv_impl="xla")
            stats = variant_stats(cfg, args.size)
            row[f"params_w{width}"] = stats["params"] / 1e6
            row[f"gflops_w{width}"] = stats["gflops"]
            row["share_depth"] = _branch_label(name, stats["share_depth"])
        rows.append(row)
    for width in args.widths:
        columns += [(f"params_w{width}", f"params (M), w={width}", ".3f"),
                    (f"gflops_w{width}", f"GFLOPs/forward, w={width}", ".1f")]
    print(f"Batch 1, {args.size}^3 input, float32, dense units 64.\n")
    print(common.markdown_table(rows, columns))
    if args.json:
        common.write_result(args.json, {"size": args.size, "rows": rows})


def _branch_label(name: str, depth: int) -> str:
    if name == "unet3d":
        return "- (seg only)"
    if name == "cnn":
        return "- (cls only)"
    return {0: "after stem", 4: "after encoder (bottom)", 5: "after decoder"}.get(
        depth, f"after level {depth}")


if __name__ == "__main__":
    main()
