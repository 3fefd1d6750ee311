"""Train and inference step throughput, model FLOP utilisation, device scaling, epoch timing.

Run from the repository root (``pip install -e .`` first):

    python benchmarks/throughput.py --model mlssp --width 16 --size 64 --batch 2
    python benchmarks/throughput.py --sweep                 # small sweep at 32^3
    python benchmarks/throughput.py --scaling --devices 1,2,4,8 --size 32 --batch 8
    python benchmarks/throughput.py --epoch                 # data-wait vs compute, one epoch

Each figure: the jitted step compiled ahead of time (compile time reported separately),
``--warmup`` untimed calls, then ``--repeats`` timed calls; median and spread. FLOPs are
XLA's count (``cost_analysis``) for the step as compiled, and the "model FLOPs" used for
MFU are XLA's count for the same step with XLA's native convolutions, so every ``--impl``
is credited with the same work. MFU = model FLOPs / median step time / device peak: the
vendor figure for a TPU/GPU (``common.DEVICE_PEAKS``), on CPU the fastest of float32 GEMMs
timed interleaved with the step (same process, same load). Results go to
``benchmarks/results/``. ``--scaling`` always runs on forced CPU devices (a code-path check).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import jax
import numpy as np

from mlssp_jax import config as config_lib
from mlssp_jax import input_pipeline, parallel, train_lib, train_step
from mlssp_jax.cli import ArgumentParser, run_command
from mlssp_jax.ops import cpu_env

ROOT = Path(__file__).resolve().parent.parent
GEMM_N = 2048  # the CPU peak reference: a float32 GEMM of this size
SWEEP_MODELS = ("mlssp", "ynet", "he", "unet3d", "cnn")
SCALING_NOTE = ("CPU devices forced with --xla_force_host_platform_device_count share the "
                "same cores: this shows the data-parallel code path and its overhead, "
                "not real speed-up.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true", help="models x widths x batches")
    mode.add_argument("--scaling", action="store_true", help="same global batch, 1..N devices")
    mode.add_argument("--epoch", action="store_true", help="one real epoch: data wait vs compute")
    mode.add_argument("--scaling-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="mlssp", choices=config_lib.MODEL_NAMES)
    parser.add_argument("--width", type=int, default=None,
                        help="base width (default 16; 8 for --sweep and --scaling)")
    parser.add_argument("--size", type=int, default=None,
                        help="VOI edge in voxels (default 64; 32 for --sweep and --scaling)")
    parser.add_argument("--batch", type=int, default=None,
                        help="global batch size (default 2; 8 for --scaling)")
    parser.add_argument("--dtype", default="float32", choices=config_lib.DTYPES)
    parser.add_argument("--impl", default="auto", choices=config_lib.CONV_IMPLS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-inference", action="store_true", help="train step only")
    parser.add_argument("--config", default=None, help="TOML config (default: built-in)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--sweep-models", default=",".join(SWEEP_MODELS))
    parser.add_argument("--sweep-widths", default="4,16")
    parser.add_argument("--sweep-batches", default="1,4")
    parser.add_argument("--devices", default="1,2,4,8", help="--scaling device counts")
    parser.add_argument("--epochs", type=int, default=1, help="--epoch: epochs to time")
    parser.add_argument("--name", default=None, help="results file name (no .json)")
    args = parser.parse_args(argv)
    small = args.sweep or args.scaling or args.scaling_worker
    scaling = args.scaling or args.scaling_worker
    defaults = {"width": 8 if small else 16, "size": 32 if small else 64,
                "batch": 8 if scaling else 2}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def make_config(args: argparse.Namespace) -> config_lib.Config:
    """Config from ``--config``/``--set`` with the benchmark's model/size/batch flags on top."""
    config = config_lib.load(args.config, args.set)
    model = dataclasses.replace(config.model, name=args.model, width=args.width,
                                dtype=args.dtype, conv_impl=args.impl)
    data = dataclasses.replace(config.data, voi_size=args.size)
    train = dataclasses.replace(config.train, batch_size=args.batch)
    config = dataclasses.replace(config, model=model, data=data, train=train)
    config_lib.validate(config, "benchmark flags")
    return config


def synthetic_batch(config: config_lib.Config, seed: int = 0) -> dict[str, np.ndarray]:
    """A random batch: image (B,S,S,S,1) in [0, 1], a blob mask (B,S,S,S,1), labels (B,)."""
    b, s = config.train.batch_size, config.data.voi_size
    rng = np.random.default_rng(seed)
    image = rng.random((b, s, s, s, 1), dtype=np.float32)
    grid = np.indices((s, s, s)).transpose(1, 2, 3, 0) - s / 2
    blob = (np.linalg.norm(grid, axis=-1) < s / 6).astype(np.float32)
    mask = np.broadcast_to(blob[None, ..., None], image.shape).copy()
    label = (np.arange(b) % 2).astype(np.float32)
    return {"image": image, "mask": mask, "label": label}


def param_bytes(params: Any) -> int:
    """Bytes of a parameter tree = bytes of gradients all-reduced per data-parallel step."""
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params)))


def _step_runner(compiled: Any, state: Any, batch: Any):
    """A zero-argument call of the compiled (donating) train step that carries its state."""
    holder = [state]

    def run() -> Any:
        holder[0], metrics = compiled(holder[0], batch)
        return holder[0], metrics

    return run


def _timed_with_peak(step: Any, repeats: int, warmup: int, dtype: str) -> dict[str, Any]:
    """Time ``step()``; on CPU interleaved with a float32 GEMM, whose FLOP/s is the peak."""
    if jax.default_backend() != "cpu":
        peak, source = common.device_peak_flops(dtype=dtype)
        stats = common.time_fn(step, repeats=repeats, warmup=warmup)
        return {**stats, "peak_flops": peak, "peak_source": source}
    gemm, gemm_flops = common.gemm_call(GEMM_N)
    timed = common.time_interleaved({"step": step, "gemm": gemm}, repeats, warmup)
    return {**timed["step"], **gemm_peak(timed["gemm"]["times"], gemm_flops)}


def gemm_peak(gemm_times: list[float], gemm_flops: float) -> dict[str, Any]:
    """The CPU peak: the fastest of the GEMM calls interleaved with the step (the median
    one is kept too; under load the fastest is the closer estimate of what the CPU can do)."""
    return {"peak_flops": gemm_flops / min(gemm_times),
            "peak_flops_median": gemm_flops / float(np.median(gemm_times)),
            "peak_source": f"measured: fastest float32 {GEMM_N}^2 matmul of those "
                           "interleaved with the step",
            "gemm_times": gemm_times}


def _xla_native(config: config_lib.Config) -> config_lib.Config:
    return dataclasses.replace(config, model=dataclasses.replace(config.model, conv_impl="xla"))


def bench_train(config: config_lib.Config, repeats: int, warmup: int) -> dict[str, Any]:
    """Compile, warm up and time the trainer's jitted train step on a synthetic batch."""
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.train.batch_size, mesh)
    state = train_step.create_train_state(config, jax.random.key(config.train.seed), mesh,
                                          steps_per_epoch=1)
    batch = parallel.shard_batch(synthetic_batch(config), mesh)
    lowered_xla = train_step.make_train_step(_xla_native(config), mesh,
                                             steps_per_epoch=1).lower(state, batch)
    step = train_step.make_train_step(config, mesh, steps_per_epoch=1)
    compiled, compile_s = common.compile_timed(step, state, batch)
    params = param_bytes(state.params)
    timed = _timed_with_peak(_step_runner(compiled, state, batch), repeats, warmup,
                             config.model.dtype)
    return {"compile_s": compile_s, "xla_flops": common.compiled_flops(compiled),
            "model_flops": common.compiled_flops(lowered_xla), "param_bytes": params,
            "devices": int(mesh.devices.size), **timed}


def bench_inference(config: config_lib.Config, repeats: int, warmup: int) -> dict[str, Any]:
    """Compile and time the prediction step (sigmoid probabilities) on a synthetic batch."""
    mesh = parallel.make_mesh()
    state = train_step.create_train_state(config, jax.random.key(config.train.seed), mesh,
                                          steps_per_epoch=1)
    images = parallel.shard_batch({"image": synthetic_batch(config)["image"]}, mesh)["image"]
    lowered_xla = train_step.make_predict_fn(_xla_native(config), mesh).lower(
        state.params, images)
    predict = train_step.make_predict_fn(config, mesh)
    compiled, compile_s = common.compile_timed(predict, state.params, images)
    timed = _timed_with_peak(lambda: compiled(state.params, images), repeats, warmup,
                             config.model.dtype)
    return {"compile_s": compile_s, "xla_flops": common.compiled_flops(compiled),
            "model_flops": common.compiled_flops(lowered_xla), **timed}


def derive(result: dict[str, Any], batch: int) -> dict[str, Any]:
    """Add volumes/s, achieved FLOP/s (model FLOPs / median time) and MFU to a timing."""
    t = result["median_s"]
    flops = result.get("model_flops") or result.get("xla_flops")
    achieved = flops / t if flops else None
    peak = result.get("peak_flops")
    return {**result, "volumes_per_s": batch / t, "achieved_flops": achieved,
            "mfu": achieved / peak if achieved and peak else None}


def bench_point(config: config_lib.Config, args: argparse.Namespace) -> dict[str, Any]:
    """Train (and inference) figures for one configuration."""
    point = {"model": config.model.name, "width": config.model.width,
             "size": config.data.voi_size, "batch": config.train.batch_size,
             "dtype": config.model.dtype, "impl": config.model.conv_impl}
    train = bench_train(config, args.repeats, args.warmup)
    point["train"] = derive(train, config.train.batch_size)
    if not args.no_inference:
        infer = bench_inference(config, args.repeats, args.warmup)
        point["inference"] = derive(infer, config.train.batch_size)
    return point


def flatten(point: dict[str, Any]) -> dict[str, Any]:
    """One table row: configuration plus train_* and infer_* figures."""
    row = {k: v for k, v in point.items() if not isinstance(v, dict)}
    for prefix, key in (("train", "train"), ("infer", "inference")):
        for name, value in point.get(key, {}).items():
            if not isinstance(value, list):
                row[f"{prefix}_{name}"] = value
    return row


TABLE_COLUMNS = [
    ("model", "model", "s"), ("width", "width", "d"), ("size", "size", "d"),
    ("batch", "batch", "d"), ("impl", "impl", "s"), ("dtype", "dtype", "s"),
    ("train_median_s", "train s/step", ".3f"), ("train_iqr_s", "IQR s", ".3f"),
    ("train_volumes_per_s", "train vol/s", ".2f"), ("train_model_flops", "GFLOP/step", ".3g"),
    ("train_achieved_gflops", "GFLOP/s", ".1f"), ("train_mfu_pct", "MFU %", ".1f"),
    ("train_peak_gflops", "peak GFLOP/s", ".0f"), ("train_compile_s", "compile s", ".1f"),
    ("infer_median_s", "infer s/step", ".3f"),
    ("infer_volumes_per_s", "infer vol/s", ".2f"), ("infer_mfu_pct", "infer MFU %", ".1f"),
]


def table_row(point: dict[str, Any]) -> dict[str, Any]:
    """A row for :data:`TABLE_COLUMNS` (GFLOP and percentages for reading)."""
    row = flatten(point)
    for prefix in ("train", "infer"):
        if row.get(f"{prefix}_model_flops"):
            row[f"{prefix}_model_flops"] = row[f"{prefix}_model_flops"] / 1e9
        if row.get(f"{prefix}_achieved_flops"):
            row[f"{prefix}_achieved_gflops"] = row[f"{prefix}_achieved_flops"] / 1e9
        if row.get(f"{prefix}_peak_flops"):
            row[f"{prefix}_peak_gflops"] = row[f"{prefix}_peak_flops"] / 1e9
        if row.get(f"{prefix}_mfu") is not None:
            row[f"{prefix}_mfu_pct"] = 100 * row[f"{prefix}_mfu"]
    return row


def run_single(args: argparse.Namespace) -> None:
    point = bench_point(make_config(args), args)
    print(common.markdown_table([table_row(point)], TABLE_COLUMNS))
    name = args.name or (f"throughput_{args.model}_w{args.width}_s{args.size}_b{args.batch}"
                         f"_{args.impl}_{args.dtype}")
    print("wrote", common.write_result(name, {"points": [point]}))


def sweep_configs(args: argparse.Namespace) -> list[config_lib.Config]:
    """One factor at a time around the base point (``--model --width --batch``)."""
    models = args.sweep_models.split(",")
    widths = [int(w) for w in args.sweep_widths.split(",")]
    batches = [int(b) for b in args.sweep_batches.split(",")]
    points = [(m, args.width, args.batch) for m in models]
    points += [(args.model, w, args.batch) for w in widths if w != args.width]
    points += [(args.model, args.width, b) for b in batches if b != args.batch]
    configs = []
    for model, width, batch in points:
        point_args = argparse.Namespace(**{**vars(args), "model": model, "width": width,
                                           "batch": batch})
        configs.append(make_config(point_args))
    return configs


def run_sweep(args: argparse.Namespace) -> None:
    points = []
    for config in sweep_configs(args):
        m = config.model
        print(f"... {m.name} w{m.width} b{config.train.batch_size} {config.data.voi_size}^3",
              flush=True)
        points.append(bench_point(config, args))
    print(common.markdown_table([table_row(p) for p in points], TABLE_COLUMNS))
    name = args.name or f"sweep_s{args.size}_{args.impl}_{args.dtype}"
    print("wrote", common.write_result(name, {"points": points}))


def all_reduce_bytes(hlo_text: str) -> tuple[int, int]:
    """(number of all-reduce ops, bytes of their results) in compiled HLO text."""
    itemsize = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f64": 8}
    count, total = 0, 0
    for line in hlo_text.splitlines():
        match = re.search(r"=\s*(.*?)\s+all-reduce(?:-start)?\(", line)
        if not match:
            continue
        count += 1
        for dtype, dims in re.findall(r"\b(f32|bf16|f16|s32|u32|f64)\[([\d,]*)\]",
                                      match.group(1)):
            total += itemsize[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
    return count, total


def scaling_worker(args: argparse.Namespace) -> None:
    """In a subprocess with N forced CPU devices: the data-parallel step, as one JSON line."""
    config = make_config(args)
    mesh = parallel.make_mesh()
    state = train_step.create_train_state(config, jax.random.key(config.train.seed), mesh,
                                          steps_per_epoch=1)
    batch = parallel.shard_batch(synthetic_batch(config), mesh)
    step = train_step.make_train_step(config, mesh, steps_per_epoch=1)
    compiled, compile_s = common.compile_timed(step, state, batch)
    ops, reduced = all_reduce_bytes(compiled.as_text())
    params = param_bytes(state.params)
    stats = common.time_fn(_step_runner(compiled, state, batch), repeats=args.repeats,
                           warmup=args.warmup)
    print(json.dumps({"devices": jax.device_count(), "compile_s": compile_s,
                      "param_bytes": params, "all_reduce_ops": ops,
                      "all_reduce_bytes": reduced, **stats}))


def _worker_env(devices: int) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    return env


def run_scaling(args: argparse.Namespace) -> None:
    print(SCALING_NOTE)
    rows = []
    forwarded = [a for a in sys.argv[1:] if a not in ("--scaling",)]
    for devices in [int(d) for d in args.devices.split(",")]:
        command = [sys.executable, __file__, "--scaling-worker", *forwarded]
        print(f"... {devices} device(s)", flush=True)
        out = subprocess.run(command, env=_worker_env(devices), capture_output=True,
                             text=True, check=False, cwd=ROOT)
        if out.returncode != 0:
            raise SystemExit(f"scaling worker ({devices} devices) failed:\n{out.stderr}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["volumes_per_s"] = args.batch / row["median_s"]
        rows.append(row)
    base = rows[0]["median_s"]
    for row in rows:
        row["speedup"] = base / row["median_s"]
        row["param_mb"] = row["param_bytes"] / 2**20
        row["all_reduce_mb"] = row["all_reduce_bytes"] / 2**20
    print(common.markdown_table(rows, [
        ("devices", "devices", "d"), ("median_s", "s/step", ".3f"), ("iqr_s", "IQR s", ".3f"),
        ("volumes_per_s", "vol/s", ".2f"), ("speedup", "speed-up", ".2f"),
        ("compile_s", "compile s", ".1f"), ("param_mb", "grad MiB (params)", ".2f"),
        ("all_reduce_ops", "all-reduce ops", "d"), ("all_reduce_mb", "all-reduce MiB", ".2f"),
    ]))
    name = args.name or f"scaling_{args.model}_w{args.width}_s{args.size}_b{args.batch}"
    print("wrote", common.write_result(name, {"note": SCALING_NOTE, "rows": rows}))


def epoch_config(args: argparse.Namespace) -> config_lib.Config:
    """``--epoch``: ``--config`` (default ``configs/quick.toml``) and ``--set``, unchanged."""
    return config_lib.load(args.config or ROOT / "configs" / "quick.toml", args.set)


def time_epoch(step: Any, state: Any, examples: list[dict], config: config_lib.Config,
               epoch: int, mesh: Any) -> tuple[Any, dict[str, float]]:
    """One epoch, each step blocked on: time waiting for the loader vs time in the step."""
    batches = input_pipeline.train_batches(examples, config, config.train.seed, epoch)
    wait = compute = 0.0
    steps = 0
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        t1 = time.perf_counter()
        if batch is None:
            break
        state, metrics = step(state, parallel.shard_batch(batch, mesh))
        jax.block_until_ready((state, metrics))
        wait, compute, steps = wait + t1 - t0, compute + time.perf_counter() - t1, steps + 1
    total = time.perf_counter() - start
    return state, {"epoch": epoch, "steps": steps, "epoch_s": total, "data_wait_s": wait,
                   "compute_s": compute, "data_wait_fraction": wait / total}


def run_epoch(args: argparse.Namespace) -> None:
    """Real data (the config's cohort, fold 0 train split), the trainer's step, timed epochs."""
    config = epoch_config(args)
    mesh = parallel.make_mesh()
    with tempfile.TemporaryDirectory() as workdir:
        examples = train_lib.load_fold_data(config, Path(workdir), fold=0)["train"]
    steps = input_pipeline.steps_per_epoch(len(examples), config.train.batch_size)
    state = train_step.create_train_state(config, jax.random.key(config.train.seed), mesh, steps)
    first = next(input_pipeline.train_batches(examples, config, config.train.seed, 0))
    step, compile_s = common.compile_timed(train_step.make_train_step(config, mesh, steps),
                                           state, parallel.shard_batch(first, mesh))
    rows = []
    for epoch in range(args.epochs):
        state, row = time_epoch(step, state, examples, config, epoch, mesh)
        rows.append({**row, "volumes_per_s": row["steps"] * config.train.batch_size
                     / row["epoch_s"]})
    print(f"{len(examples)} training VOIs, {steps} steps/epoch, "
          f"workers={config.train.workers}, compile {compile_s:.1f} s (not in the epochs)")
    print(common.markdown_table(rows, [
        ("epoch", "epoch", "d"), ("steps", "steps", "d"), ("epoch_s", "epoch s", ".1f"),
        ("data_wait_s", "data wait s", ".2f"), ("compute_s", "compute s", ".1f"),
        ("data_wait_fraction", "wait fraction", ".1%"), ("volumes_per_s", "vol/s", ".2f")]))
    name = args.name or "epoch_" + Path(args.config or "quick.toml").stem
    print("wrote", common.write_result(name, {"config": config_lib.to_dict(config),
                                              "compile_s": compile_s, "epochs": rows}))


def main(argv: list[str] | None = None) -> int:
    cpu_env.prepare_process()
    args = parse_args(argv)
    if args.scaling_worker:
        scaling_worker(args)
    elif args.scaling:
        run_scaling(args)
    elif args.sweep:
        run_sweep(args)
    elif args.epoch:
        run_epoch(args)
    else:
        run_single(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
