"""The package's exceptions: bad user input (SPEC.md, "Errors") and a diverged training."""


class InputError(Exception):
    """Bad input from the user: a file, a manifest row or an option.

    The message names the file or option and what is wrong, e.g.
    ``"data/manifest.csv: line 4: label must be 0 or 1, got '2'"``. Commands turn it into
    one ``error: <message>`` line on stderr and exit code 2 (see :mod:`mlssp_jax.cli`).
    """


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step. Commands turn it into one
    ``error: ...`` line and exit code 1 (the last good checkpoint is kept)."""
