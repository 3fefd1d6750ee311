"""Shared timing helpers for the scripts in ``benchmarks/`` (never imported by the package).

A script run as ``python benchmarks/<name>.py`` has ``benchmarks/`` on ``sys.path``, so it
imports this module as ``import common``.

API (all times in seconds, FLOP counts in floating-point operations, rates in FLOP/s):

- ``time_fn(fn, *args, repeats=5, warmup=1) -> dict``: call ``fn(*args)`` ``warmup`` times
  untimed, then ``repeats`` times timed, blocking on the result each call
  (``jax.block_until_ready``). Returns ``summarize(times)``.
- ``summarize(times) -> dict(median_s, min_s, max_s, iqr_s, mean_s, repeats, times)``.
- ``time_interleaved(calls, repeats=5, warmup=1) -> {name: summarize(...)}``: zero-argument
  callables timed round-robin (a, b, a, b, ...), so load on a shared machine hits all alike.
- ``gemm_call(n=2048) -> (call, flops)``: a zero-argument jitted float32 ``n x n`` matmul
  and its FLOP count, to time interleaved with a step as that moment's CPU peak.
- ``compile_timed(jitted, *args) -> (compiled, compile_s)``: ``jitted.lower(*args).compile()``,
  timed (tracing + lowering + XLA compilation).
- ``compiled_flops(compiled) -> float | None``: XLA-counted FLOPs of one call, from
  ``compiled.cost_analysis()`` (a dict, or a list of per-module dicts, depending on version).
- ``measured_cpu_peak_flops(n=4096, repeats=3) -> float``: FLOP/s of a jitted float32
  ``n x n`` matmul in this process (median; cached per process). The CPU "peak" for MFU;
  under load prefer ``gemm_call`` timed interleaved with the step.
- ``device_peak_flops(device=None, dtype="float32") -> (flops, source)``: the vendor's peak
  dense FLOP/s for a TPU/GPU (``DEVICE_PEAKS``), or on CPU the measured GEMM peak.
- ``machine_info() -> dict``: CPU model, core count, backend, device kind, jax version,
  relevant environment variables, UTC date.
- ``write_result(name, obj) -> Path``: ``benchmarks/results/<name>.json`` (atomic), with
  ``machine_info()`` and the command line added under ``"meta"``.
- ``markdown_table(rows, columns) -> str``: rows are dicts; columns ``[(key, header, fmt)]``.

Timings on a shared machine are noisy: compare implementations interleaved in one process
and report medians with their spread.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Peak dense (no structured sparsity) FLOP/s per chip, from the vendors' published figures.
# TPUs: Cloud TPU system-architecture pages (docs.cloud.google.com/tpu/docs/v4, /v5e,
#   /v5p, /v6e): "Peak compute per chip (bf16)". TPUs publish no float32 matmul peak;
#   float32 matmuls at JAX's default precision run as bf16 MXU passes, so the bf16 peak is
#   used for both dtypes (the source string says so).
# GPUs: NVIDIA A100 datasheet (SXM): FP32 19.5 TFLOPS, TF32 156, BF16 312 (dense);
#   NVIDIA H100 datasheet (SXM5): FP32 67 TFLOPS, TF32 494.7 dense (989 with sparsity),
#   BF16 989.5 dense (1979 with sparsity). XLA runs float32 convs/matmuls as TF32 on these
#   GPUs at default precision, so "float32" maps to the TF32 peak.
DEVICE_PEAKS: dict[str, dict[str, float]] = {
    "tpu v4": {"bfloat16": 275e12, "float32": 275e12},
    "tpu v5e": {"bfloat16": 197e12, "float32": 197e12},
    "tpu v5p": {"bfloat16": 459e12, "float32": 459e12},
    "tpu v6e": {"bfloat16": 918e12, "float32": 918e12},
    "a100": {"bfloat16": 312e12, "float32": 156e12},
    "h100": {"bfloat16": 989.5e12, "float32": 494.7e12},
}

# jax `device_kind` strings -> keys of DEVICE_PEAKS (v5e/v6e report themselves as "lite").
_KIND_ALIASES = (
    ("tpu v5 lite", "tpu v5e"), ("tpu v5e", "tpu v5e"), ("tpu v5p", "tpu v5p"),
    ("tpu v5", "tpu v5p"), ("tpu v6 lite", "tpu v6e"), ("tpu v6e", "tpu v6e"),
    ("tpu v4", "tpu v4"), ("a100", "a100"), ("h100", "h100"),
)


def summarize(times: Sequence[float]) -> dict[str, Any]:
    """Median, min, max, inter-quartile range and mean of wall times (s)."""
    arr = np.asarray(times, dtype=np.float64)
    q1, q3 = np.percentile(arr, [25, 75])
    return {
        "median_s": float(np.median(arr)), "min_s": float(arr.min()),
        "max_s": float(arr.max()), "iqr_s": float(q3 - q1), "mean_s": float(arr.mean()),
        "repeats": int(arr.size), "times": [float(t) for t in arr],
    }


def time_fn(fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1) -> dict:
    """Wall time of ``fn(*args)`` (blocked until ready): ``warmup`` untimed calls, then
    ``repeats`` timed ones. For a step that donates its input, pass a closure that carries
    the state from call to call."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return summarize(times)


def time_interleaved(calls: dict[str, Callable[[], Any]], repeats: int = 5,
                     warmup: int = 1) -> dict[str, dict]:
    """Time zero-argument callables round-robin; ``{name: summarize(times)}``."""
    for _ in range(warmup):
        for call in calls.values():
            jax.block_until_ready(call())
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    return {name: summarize(t) for name, t in times.items()}


def gemm_call(n: int = 2048) -> tuple[Callable[[], Any], float]:
    """A jitted float32 ``(n, n) @ (n, n)`` on the CPU as a zero-argument call, and its FLOPs."""
    cpu = jax.devices("cpu")[0]
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(key_a, (n, n), jnp.float32), cpu)
    b = jax.device_put(jax.random.normal(key_b, (n, n), jnp.float32), cpu)
    matmul = jax.jit(jnp.matmul)
    return (lambda: matmul(a, b)), 2.0 * n**3


def compile_timed(jitted: Any, *args: Any) -> tuple[Any, float]:
    """Ahead-of-time compile ``jitted`` for ``args``; return (compiled, seconds)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def compiled_flops(compiled: Any) -> float | None:
    """XLA's FLOP count for one call of a compiled function (None if not reported)."""
    analysis = compiled.cost_analysis()
    if analysis is None:
        return None
    if isinstance(analysis, dict):
        analysis = [analysis]
    flops = [a.get("flops") for a in analysis if a and a.get("flops") is not None]
    return float(sum(flops)) if flops else None


@functools.cache
def measured_cpu_peak_flops(n: int = 4096, repeats: int = 3) -> float:
    """Median FLOP/s of a jitted float32 ``(n, n) @ (n, n)`` matmul on the CPU backend."""
    call, flops = gemm_call(n)
    return flops / time_fn(call, repeats=repeats, warmup=1)["median_s"]


def _peak_key(device_kind: str) -> str | None:
    kind = device_kind.lower()
    for alias, key in _KIND_ALIASES:
        if alias in kind:
            return key
    return None


def device_peak_flops(device: Any = None, dtype: str = "float32") -> tuple[float | None, str]:
    """Peak FLOP/s of ``device`` (default: the first device) and where the figure comes from.

    CPU: a float32 GEMM measured now (same process). Unknown accelerator: ``(None, reason)``.
    """
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return measured_cpu_peak_flops(), "measured: jitted float32 4096^2 matmul, this process"
    key = _peak_key(device.device_kind)
    if key is None:
        return None, f"no peak known for device kind {device.device_kind!r}"
    peak = DEVICE_PEAKS[key][dtype]
    note = " (TPU: bf16 MXU peak, no fp32 figure published)" if key.startswith("tpu") else ""
    if key in ("a100", "h100") and dtype == "float32":
        note = " (TF32 tensor-core peak)"
    return peak, f"vendor datasheet: {key} {dtype}{note}"


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Where and when a figure was taken."""
    device = jax.devices()[0]
    env_keys = ("XLA_FLAGS", "GLIBC_TUNABLES", "JAX_PLATFORMS", "OMP_NUM_THREADS")
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(), "device_kind": device.device_kind,
        "device_count": jax.device_count(), "jax_version": jax.__version__,
        "python": platform.python_version(),
        "env": {k: os.environ[k] for k in env_keys if k in os.environ},
    }


def write_result(name: str, obj: dict[str, Any]) -> Path:
    """Write ``obj`` plus ``meta`` (machine, command line) to ``benchmarks/results/<name>.json``."""
    from mlssp_jax.fileio import write_json

    path = RESULTS_DIR / f"{name}.json"
    command = "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    write_json(path, {"meta": {**machine_info(), "command": command}, **obj})
    return path


def markdown_table(rows: Sequence[dict[str, Any]],
                   columns: Sequence[tuple[str, str, str]]) -> str:
    """A markdown table: ``columns`` are ``(key, header, format spec)``; missing -> '-'."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
