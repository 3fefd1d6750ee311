"""Shared fixtures: CPU-only JAX, session caches, a tiny synthetic cohort and one tiny training
run, each built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from helpers import TINY_CONFIG, run_train, train_command, train_env  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def session_caches(tmp_path_factory):
    """Keep the session's caches in its tmp dir, for this process and its subprocesses:
    the cohorts and preprocessed volumes (never the user's ``~/.cache/mlssp_jax``) and one
    persistent XLA compilation cache (every program, however fast it compiled)."""
    import jax

    base = tmp_path_factory.getbasetemp()
    from mlssp_jax.ops import cpu_env, onednn

    # what the commands' cpu_env.prepare_process does, for the tests run in this process
    cpu_env.configure_environment(xla_convs=not onednn.buildable())
    env = {"MLSSP_JAX_CACHE": str(base / "mlssp_cache"),
           # set for subprocesses up front, so commands do not re-exec themselves to get it
           "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", cpu_env.GLIBC_TUNABLES),
           "JAX_COMPILATION_CACHE_DIR": str(base / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    os.environ.update(env)
    jax.config.update("jax_compilation_cache_dir", env["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """A small synthetic cohort (``--small`` volumes): 10 subjects, 5 AVM. Returns the manifest."""
    from mlssp_jax.synth import generate_cohort

    out = tmp_path_factory.mktemp("tiny_cohort")
    return generate_cohort(out, n_subjects=10, n_avm=5, seed=0, small=True)


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory):
    """helpers.TINY_CONFIG as a TOML file."""
    path = tmp_path_factory.getbasetemp() / "tiny_train.toml"
    path.write_text(TINY_CONFIG)
    return path


@pytest.fixture(scope="session")
def tiny_run(tiny_config, tiny_cohort, tmp_path_factory):
    """Fold 0 of the tiny cohort trained 2 epochs by ``python -m mlssp_jax.train`` (a subprocess)
    with the tiny config, uninterrupted. Returns the workdir; read-only for tests."""
    workdir = tmp_path_factory.getbasetemp() / "tiny_run"
    run_train(train_env(), *train_command(tiny_config, tiny_cohort, workdir))
    return workdir
