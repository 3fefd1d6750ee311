"""Command-line plumbing shared by every ``python -m mlssp_jax.<command>``.

Bad input (an :class:`~mlssp_jax.errors.InputError` or an argparse error) becomes one
``error: ...`` line on stderr and exit code 2, never a traceback (SPEC.md, "Errors").
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from mlssp_jax.errors import InputError

EXIT_BAD_INPUT = 2
QUIET_LOGGERS = ("absl", "jax._src.xla_bridge")  # INFO chatter a user need not read


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad option as one ``error: ...`` line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message}\n")
        sys.exit(EXIT_BAD_INPUT)


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr with a short time-stamped format (INFO, or DEBUG if verbose).

    The ``absl`` logger (orbax logs every checkpoint save and restore through it at INFO)
    and JAX's backend setup (``Unable to initialize backend 'tpu'`` at INFO on every CPU run)
    are kept at WARNING unless verbose.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,  # orbax and grain install a WARNING root handler at import
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


def diverged(err: Exception, kept_in: object) -> int:
    """A :class:`~mlssp_jax.errors.TrainingDiverged` as one ``error:`` line; exit code 1."""
    sys.stderr.write(f"error: {err}; the last good checkpoint is kept in {kept_in}\n")
    return 1


def run_command(main: Callable[[Sequence[str] | None], int | None],
                argv: Sequence[str] | None = None) -> int:
    """Run a command's ``main(argv)``; turn :class:`InputError` into ``error:`` + exit 2."""
    try:
        return int(main(argv) or 0)
    except InputError as err:
        sys.stderr.write(f"error: {err}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
