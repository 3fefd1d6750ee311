"""Command-line plumbing shared by every ``python -m mlssp_jax.<command>``.

Bad input (an :class:`~mlssp_jax.errors.InputError` or an argparse error) becomes one
``error: ...`` line on stderr and exit code 2, never a traceback (SPEC.md, "Errors"); a
failed write (an OSError: disk full, permission denied) one ``error: ...`` line and exit 1.
Commands own the progress bars; log lines (from this process and from its worker
processes, :func:`worker_logging`) and the error line print above a running bar, never
glued to it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import logging.handlers
import sys
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.context import BaseContext

from tqdm import tqdm

from mlssp_jax.errors import InputError

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
QUIET_LOGGERS = ("absl", "jax._src.xla_bridge")  # INFO chatter a user need not read


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad option as one ``error: ...`` line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        error_line(message)
        sys.exit(EXIT_BAD_INPUT)


class BarAwareHandler(logging.StreamHandler):
    """A stderr handler that prints each record above the running tqdm bars (``tqdm.write``)."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self.stream, "closed", False):  # at interpreter exit, or a test's capture
            return
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own contract: never raise from emit
            self.handleError(record)


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr with a short time-stamped format (INFO, or DEBUG if verbose).

    Records print above running progress bars (:class:`BarAwareHandler`). The ``absl``
    logger (orbax logs every checkpoint save and restore through it at INFO) and JAX's
    backend setup (``Unable to initialize backend 'tpu'`` at INFO on every CPU run) are kept
    at WARNING unless verbose.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        handlers=[BarAwareHandler(sys.stderr)],
        force=True,  # orbax and grain install a WARNING root handler at import
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


def diverged(err: Exception, kept_in: object) -> int:
    """A :class:`~mlssp_jax.errors.TrainingDiverged` as one ``error:`` line; exit code 1."""
    error_line(f"{err}; the last good checkpoint is kept in {kept_in}")
    return EXIT_FAILED


def _forward_to(queue, level: int) -> None:
    """Worker initializer: send every log record at ``level`` or above to ``queue``."""
    root = logging.getLogger()
    root.handlers = [logging.handlers.QueueHandler(queue)]
    root.setLevel(level)


@contextlib.contextmanager
def worker_logging(ctx: BaseContext) -> Iterator[dict]:
    """``initializer``/``initargs`` for a process pool of context ``ctx`` whose workers' log
    records are printed by this process's handlers (above its bars, not glued to them)."""
    queue = ctx.Queue()
    root = logging.getLogger()
    listener = logging.handlers.QueueListener(queue, *root.handlers,
                                              respect_handler_level=True)
    listener.start()
    try:
        yield {"initializer": _forward_to, "initargs": (queue, root.getEffectiveLevel())}
    finally:
        listener.stop()


def error_line(message: object) -> None:
    """Close the running progress bars, then write ``error: <message>`` as one stderr line
    (newlines in the message escaped), at the start of a line."""
    bars = list(getattr(tqdm, "_instances", ()))
    for bar in bars:
        bar.close()
    text = str(message).replace("\r", "\\r").replace("\n", "\\n")
    start = "\n" if bars else ""  # a closed bar may leave the cursor after its text
    sys.stderr.write(f"{start}error: {text}\n")
    sys.stderr.flush()


def run_command(main: Callable[[Sequence[str] | None], int | None],
                argv: Sequence[str] | None = None) -> int:
    """Run a command's ``main(argv)``: :class:`InputError` -> one ``error:`` line + exit 2,
    OSError (a failed write, e.g. disk full) -> one ``error:`` line + exit 1."""
    try:
        return int(main(argv) or 0)
    except InputError as err:
        error_line(err)
        return EXIT_BAD_INPUT
    except OSError as err:
        error_line(f"{err.filename}: {err.strerror}" if err.filename else err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        error_line("interrupted")
        return 130
