"""Process environment that makes XLA's CPU backend fast for this network.

Two settings, measured on a 2-core Zen 5 (``/work/shared/PERF_NOTES.md``, issue 8):

- ``XLA_FLAGS += --xla_cpu_experimental_ynn_fusion_type=individual_dot,eltwise,reduce``,
  only when the 3-D convolutions run as XLA 2-D convs (``conv_ops`` ``"cpu"``, i.e. when
  the oneDNN convolution cannot be built here): keeps 2-D convolutions out of YNNPACK
  (which used ~1 of 2 cores) so they run on Eigen. With oneDNN running the convolutions
  the flag costs 6% of a train step (1.56 vs 1.46 s, width 16, 64^3, batch 2), so it is
  not applied. XLA reads ``XLA_FLAGS`` once, when JAX creates its first backend, so
  :func:`configure_environment` must run before the first computation: commands call
  :func:`prepare_process` first thing (importing a module never changes the environment).
  It is applied only when JAX will run on the CPU
  (``JAX_PLATFORMS`` is ``cpu``, or no TPU/GPU plugin is installed) and jaxlib is a
  version the flag was checked against (:data:`FLAG_CHECKED_JAXLIB`): an XLA build that
  does not know a flag aborts the process, so accelerator runs and untested jaxlibs are
  left untouched.
- ``GLIBC_TUNABLES`` (malloc arenas, no mmap, no trimming, huge pages): without them XLA's
  per-step temporaries go through mmap/munmap and page faults. glibc reads them only at
  process start, so :func:`maybe_reexec` re-executes the command with them set. Measured
  on the width-16 64^3 forward+backward step (batch 2): minor page faults 365,520 -> 0
  and system time 0.77 -> 0.06 s per step.

Opt out of both with ``MLSSP_JAX_NO_CPU_TUNING=1``. Settings already present in the
environment are kept (flags are appended, never replaced).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import sys

from mlssp_jax.ops import onednn

log = logging.getLogger(__name__)

OPT_OUT_VAR = "MLSSP_JAX_NO_CPU_TUNING"
XLA_CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=individual_dot,eltwise,reduce",)
GLIBC_TUNABLES = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
    "glibc.malloc.trim_threshold=68719476736:glibc.malloc.hugetlb=1"
)
# jaxlib (major, minor) versions whose XLA knows XLA_CPU_FLAGS (checked: 0.10.2).
FLAG_CHECKED_JAXLIB = ((0, 10),)
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "jax_metal")


def tuning_enabled() -> bool:
    """False when the user opted out with ``MLSSP_JAX_NO_CPU_TUNING=1``."""
    return os.environ.get(OPT_OUT_VAR, "") not in ("1", "true", "yes")


def runs_on_cpu() -> bool:
    """Whether JAX will use its CPU backend, decided without initialising JAX.

    True if ``JAX_PLATFORMS`` names only ``cpu``, or it is unset and no accelerator
    plugin (libtpu, CUDA, ROCm, Metal) is installed.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms == "cpu"
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def flags_known() -> bool:
    """Whether the installed jaxlib is one whose XLA accepts :data:`XLA_CPU_FLAGS`."""
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return False
    major_minor = tuple(int(part) for part in version.split(".")[:2])
    return major_minor in FLAG_CHECKED_JAXLIB


def configure_environment(xla_convs: bool = True) -> bool:
    """Append the CPU XLA flags to ``XLA_FLAGS`` if on CPU, the convolutions run as XLA
    convs (``xla_convs``) and not opted out. Idempotent.

    Returns whether the flags are in force. Has no effect if JAX already created its
    backend (XLA has read ``XLA_FLAGS`` by then); a warning says so.
    """
    if not (xla_convs and tuning_enabled() and runs_on_cpu() and flags_known()):
        return False
    current = os.environ.get("XLA_FLAGS", "")
    missing = [f for f in XLA_CPU_FLAGS if f.split("=")[0] not in current]
    if not missing:
        return True
    if _backend_initialised():
        log.warning("JAX backend already initialised; XLA_FLAGS %s not applied", missing)
        return False
    os.environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()
    return True


def _backend_initialised() -> bool:
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(xla_bridge is not None and getattr(xla_bridge, "_backends", None))


def maybe_reexec() -> None:
    """Re-execute this command with :data:`GLIBC_TUNABLES` set, if that helps and is safe.

    Call it first thing in a command's ``main`` (before any heavy work: the process image is
    replaced). Does nothing when tuning is opted out, JAX will not run on the CPU, the user
    already set ``GLIBC_TUNABLES`` (theirs is kept), or this process is the re-executed one.
    The command line is the original one (``sys.orig_argv``), so ``python -m pkg.mod`` and
    script invocations are both re-run unchanged.
    """
    if not (tuning_enabled() and runs_on_cpu()) or "GLIBC_TUNABLES" in os.environ:
        return
    env = {**os.environ, "GLIBC_TUNABLES": GLIBC_TUNABLES}
    log.debug("re-executing with GLIBC_TUNABLES=%s", GLIBC_TUNABLES)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def prepare_process(reexec: bool = True) -> None:
    """A command's first call (before JAX starts): :func:`maybe_reexec` (if ``reexec``), then
    the XLA flags of :func:`configure_environment` if the convolutions will run as XLA convs
    (oneDNN not buildable here; :func:`onednn.buildable` compiles nothing and starts no
    backend). ``reexec=False`` for short commands (``predict``): the re-executed process
    imports every module again (2-5 s), more than the tunables save there."""
    if reexec:
        maybe_reexec()
    configure_environment(xla_convs=not onednn.buildable())
