"""``python -m mlssp_jax.synth``: see :func:`mlssp_jax.synth.cohort.main`."""

from mlssp_jax.cli import run_command
from mlssp_jax.synth.cohort import main

if __name__ == "__main__":
    raise SystemExit(run_command(main))
