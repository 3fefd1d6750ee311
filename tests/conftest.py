"""Shared fixtures: CPU-only JAX and a tiny synthetic cohort built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """A small synthetic cohort (``--small`` volumes): 10 subjects, 5 AVM. Returns the manifest."""
    from mlssp_jax.synth import generate_cohort

    out = tmp_path_factory.mktemp("tiny_cohort")
    return generate_cohort(out, n_subjects=10, n_avm=5, seed=0, small=True)
