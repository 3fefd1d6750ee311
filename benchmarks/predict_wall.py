"""Wall time of ``python -m mlssp_jax.predict``, everything included, split into its phases.

    python benchmarks/predict_wall.py --workdir W --image SCAN [--repeats 3] [--cold]
        [--json NAME] [-- EXTRA PREDICT OPTIONS]

Runs the command ``--repeats`` times as a fresh process (start-up, imports, checks, restoring
the folds, preprocessing incl. the skull strip, windows, classification, resampling back,
descriptors, writing NIfTI/JSON/PNG/CSV) and reports the median wall time of the process and
of each phase predict logs (``run: wall s ...`` and ``<scan>: wall s ...`` lines), with the
CPU seconds and the load average before each run. ``--cold`` first runs once with an empty
XLA compilation cache (a temporary ``JAX_COMPILATION_CACHE_DIR``; the oneDNN build cache
stays) and reports it apart; the timed runs then use the project's cache, warmed by one
untimed run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

PHASES = re.compile(r"INFO (run|\S+): wall s (.*) \(CPU s (.*)\)")


def run_once(argv: list[str], env: dict) -> dict:
    """One predict process: its wall s, load before, and {phase: (wall s, CPU s)}."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"predict failed:\n{done.stderr[-2000:]}")
    phases = {}
    for kind, walls, cpus in PHASES.findall(done.stderr):
        for item, cpu in zip(walls.split(" / "), cpus.split(" / "), strict=True):
            name, value = item.rsplit(" ", 1)
            phases[name if kind == "run" else f"scan: {name}"] = (float(value), float(cpu))
    return {"wall": wall, "load": load, "phases": phases}


def summary(runs: list[dict]) -> list[dict]:
    """Median wall and CPU s per phase over ``runs``, then the process's total."""
    rows = [{"phase": name, "wall": float(np.median([r["phases"][name][0] for r in runs])),
             "cpu": float(np.median([r["phases"][name][1] for r in runs]))}
            for name in runs[0]["phases"]]
    rows.append({"phase": "process total", "wall": float(np.median([r["wall"] for r in runs])),
                 "cpu": float("nan")})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--json", default="")
    parser.add_argument("extra", nargs="*", help="more predict options (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "mlssp_jax.predict", "--workdir", str(args.workdir),
                "--image", str(args.image), "--out", str(Path(tmp) / "out"), *args.extra]
        env = dict(os.environ)
        cold = None
        if args.cold:
            cold = run_once(argv, {**env, "JAX_COMPILATION_CACHE_DIR": str(Path(tmp) / "xla")})
            print(f"cold XLA cache: wall {cold['wall']:.2f} s (load {cold['load']:.1f}); "
                  + ", ".join(f"{k} {v[0]:.2f}" for k, v in cold["phases"].items()))
        run_once(argv, env)  # warms the project's cache
        runs = [run_once(argv, env) for _ in range(args.repeats)]
    loads = [r["load"] for r in runs]
    print(f"{args.repeats} warm runs, load average {min(loads):.1f}-{max(loads):.1f}; walls "
          + ", ".join(f"{r['wall']:.2f}" for r in runs))
    rows = summary(runs)
    print(common.markdown_table(rows, [("phase", "phase", "s"), ("wall", "wall s (median)", ".2f"),
                                       ("cpu", "CPU s (median)", ".2f")]))
    if args.json:
        common.write_result(args.json, {"cold": cold, "runs": runs, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
