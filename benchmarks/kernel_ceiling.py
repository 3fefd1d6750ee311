"""How fast can XLA's CPU kernels go? A lower bound on the JAX train step from kernel rates.

The CPU path (``conv_ops`` ``"cpu"``) turns every 3x3x3 conv into XLA 2-D convs (run by
Eigen) and matmuls. This script times, interleaved in one process, the bare kernels it issues
for the network's largest layers (width ``w`` at the VOI size ``S``, batch ``B``):

- ``fwd``: the forward / input-gradient form, a 2-D 3x3 conv Cin -> 3 Cout over the B*S
  planes of S x S (``conv_ops._conv2d``);
- ``wgrad``: the kernel-gradient form (``conv_ops._weight_grad``, one conv);
- a float32 2048^2 GEMM (XLA ``dot``),

each credited with the FLOPs of the 3-D conv pass it stands for (2 x voxels x 27 x Cin x
Cout, a multiply-add = 2). The fastest rate of any of them, R, bounds the step from below:
a train step of F model FLOPs (XLA's count of the native-conv step, as in
``throughput.py``) cannot take less than F / R even if every FLOP ran in the fastest kernel
and nothing else (element-wise ops, transposes, Adam) took any time.

    python benchmarks/kernel_ceiling.py --width 16 --size 64 --batch 2 --repeats 7 [--json NAME]
"""

from __future__ import annotations

import argparse

import common
import jax
import jax.numpy as jnp
import numpy as np
import throughput

from mlssp_jax import conv_ops, cpu_env, parallel, train_lib


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="write benchmarks/results/NAME.json")
    return parser.parse_args(argv)


def kernel_calls(width: int, size: int, batch: int) -> dict[str, tuple]:
    """name -> (zero-argument call, FLOPs credited) for the kernels of the S^3 layers."""
    rng = np.random.default_rng(0)
    calls = {}
    for cin, cout in ((width, width), (2 * width, width), (width, 2 * width)):
        x = jnp.asarray(rng.normal(size=(batch, size, size, size, cin)), jnp.float32)
        g = jnp.asarray(rng.normal(size=(batch, size, size, size, cout)), jnp.float32)
        planes = x.reshape(batch * size, size, size, cin)
        k2d = jnp.asarray(rng.normal(size=(3, 3, cin, 3 * cout)), jnp.float32)
        flops = 2.0 * batch * size**3 * 27 * cin * cout
        fwd = jax.jit(conv_ops._conv2d)
        wgrad = jax.jit(lambda x, g: conv_ops._weight_grad(x, g, split=False))
        calls[f"fwd {cin}->{cout} @{size}"] = (lambda f=fwd, a=planes, b=k2d: f(a, b), flops)
        calls[f"wgrad {cin}->{cout} @{size}"] = (lambda f=wgrad, a=x, b=g: f(a, b), flops)
    gemm, gemm_flops = common.gemm_call(2048)
    calls["GEMM 2048^2"] = (gemm, gemm_flops)
    return calls


def model_flops(width: int, size: int, batch: int) -> float:
    """XLA's FLOP count of the MLSSP train step with native convs (as throughput.py)."""
    args = throughput.parse_args(["--model", "mlssp", "--width", str(width), "--size",
                                  str(size), "--batch", str(batch), "--impl", "xla"])
    config = throughput.make_config(args)
    mesh = parallel.make_mesh()
    state = train_lib.create_train_state(config, jax.random.key(0), mesh)
    batch_arrays = parallel.shard_batch(throughput.synthetic_batch(config), mesh)
    return common.compiled_flops(train_lib.make_train_step(config, mesh).lower(state,
                                                                              batch_arrays))


def main(argv: list[str] | None = None) -> int:
    cpu_env.maybe_reexec()
    args = parse_args(argv)
    calls = kernel_calls(args.width, args.size, args.batch)
    timed = common.time_interleaved({name: call for name, (call, _) in calls.items()},
                                    args.repeats, warmup=2)
    rows = []
    for name, (_, flops) in calls.items():
        stats = timed[name]
        rows.append({"kernel": name, "ms": stats["median_s"] * 1e3,
                     "gflops": flops / stats["median_s"] / 1e9,
                     "gflops_max": flops / stats["min_s"] / 1e9})
    best = max(row["gflops_max"] for row in rows)
    flops = model_flops(args.width, args.size, args.batch)
    bound_s = flops / (best * 1e9)
    print(common.markdown_table(rows, [("kernel", "kernel", "s"), ("ms", "ms (median)", ".1f"),
                                       ("gflops", "GFLOP/s (median)", ".1f"),
                                       ("gflops_max", "GFLOP/s (fastest call)", ".1f")]))
    print(f"\nmodel FLOPs per train step (XLA count, native convs): {flops / 1e9:.1f} GFLOP")
    print(f"fastest kernel rate: {best:.1f} GFLOP/s -> lower bound on the JAX step: "
          f"{bound_s:.3f} s")
    if args.json:
        common.write_result(args.json, {"args": vars(args), "rows": rows, "timed": timed,
                                        "model_flops": flops, "best_gflops": best,
                                        "step_lower_bound_s": bound_s})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
