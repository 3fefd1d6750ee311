"""How fast can XLA's CPU kernels go? A lower bound on the JAX train step from kernel rates.

The CPU path (``conv_ops`` ``"cpu"``) turns every 3x3x3 conv into XLA 2-D convs (run by
Eigen) and matmuls. This script times, interleaved in one process, the bare kernels it issues
for the network's largest layers (width ``w`` at the VOI size ``S``, batch ``B``):

- ``fwd``: the forward / input-gradient form, a 2-D 3x3 conv Cin -> 3 Cout over the B*S
  planes of S x S (``conv_ops._conv2d``);
- ``wgrad``: the kernel-gradient form (``conv_ops._weight_grad``, one conv);
- a float32 2048^2 GEMM (XLA ``dot``),

each credited with the FLOPs of the 3-D conv pass it stands for (2 x voxels x 27 x Cin x
Cout, a multiply-add = 2). Two lower bounds on the train step of F model FLOPs (XLA's count
of the native-conv step, as in ``throughput.py``), both ignoring every element-wise op,
transpose and Adam:

- ``any kernel``: F / R, R the fastest rate of any kernel above (the GEMM, usually);
- ``these kernels``: the S^3 layers of MLSSP (stem 1 -> w, four w -> w, one 2w -> w, one
  w -> 2w; as in ``models.py``) with each pass at the fastest rate of its own kernel (forward
  and input gradient at the ``fwd`` rate of their shapes, kernel gradient at the ``wgrad``
  rate), and the rest of F at R. This is the floor of the CPU path as built.

    python benchmarks/kernel_ceiling.py --width 16 --size 64 --batch 2 --repeats 7 [--json NAME]
"""

from __future__ import annotations

import argparse

import common
import jax
import jax.numpy as jnp
import numpy as np
import throughput

from mlssp_jax import parallel, train_step
from mlssp_jax.ops import conv_ops, cpu_env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="write benchmarks/results/NAME.json")
    return parser.parse_args(argv)


def full_size_layers(width: int) -> list[tuple[int, int, int]]:
    """(Cin, Cout, count) of MLSSP's 3x3x3 convs at the VOI size (stem, enc1, dec1, cls)."""
    return [(1, width, 1), (width, width, 4), (2 * width, width, 1), (width, 2 * width, 1)]


def kernel_calls(width: int, size: int, batch: int) -> dict[str, tuple]:
    """name -> (zero-argument call, FLOPs credited) for the kernels of the S^3 layers."""
    rng = np.random.default_rng(0)
    calls = {}
    for cin, cout, _ in full_size_layers(width)[1:]:
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
    state = train_step.create_train_state(config, jax.random.key(0), mesh, steps_per_epoch=1)
    batch_arrays = parallel.shard_batch(throughput.synthetic_batch(config), mesh)
    step = train_step.make_train_step(config, mesh, steps_per_epoch=1)
    return common.compiled_flops(step.lower(state, batch_arrays))


def layer_bound_s(width: int, size: int, batch: int, rates: dict[str, float],
                  flops: float) -> float:
    """Lower bound (s) of the step with each S^3 pass at its own kernel's rate (FLOP/s)."""
    best = max(rates.values())
    seconds, covered = 0.0, 0.0
    for cin, cout, count in full_size_layers(width):
        pass_flops = 2.0 * batch * size**3 * 27 * cin * cout
        fwd = rates.get(f"fwd {cin}->{cout} @{size}", best)
        dgrad = rates.get(f"fwd {cout}->{cin} @{size}", best)
        wgrad = rates.get(f"wgrad {cin}->{cout} @{size}", best)
        passes = [fwd, wgrad] if cin == 1 else [fwd, dgrad, wgrad]  # no input grad of data
        seconds += count * sum(pass_flops / rate for rate in passes)
        covered += count * pass_flops * len(passes)
    return seconds + (flops - covered) / best


def main(argv: list[str] | None = None) -> int:
    cpu_env.prepare_process()
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
    rates = {row["kernel"]: row["gflops_max"] * 1e9 for row in rows}
    best = max(rates.values())
    flops = model_flops(args.width, args.size, args.batch)
    bound_s = flops / best
    layer_bound = layer_bound_s(args.width, args.size, args.batch, rates, flops)
    print(common.markdown_table(rows, [("kernel", "kernel", "s"), ("ms", "ms (median)", ".1f"),
                                       ("gflops", "GFLOP/s (median)", ".1f"),
                                       ("gflops_max", "GFLOP/s (fastest call)", ".1f")]))
    print(f"\nmodel FLOPs per train step (XLA count, native convs): {flops / 1e9:.1f} GFLOP")
    print(f"lower bound on the JAX step, any kernel ({best / 1e9:.1f} GFLOP/s): {bound_s:.3f} s")
    print(f"lower bound on the JAX step, these kernels: {layer_bound:.3f} s")
    if args.json:
        common.write_result(args.json, {"args": vars(args), "rows": rows, "timed": timed,
                                        "model_flops": flops, "best_flops_per_s": best,
                                        "bound_any_kernel_s": bound_s,
                                        "bound_these_kernels_s": layer_bound})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
