"""CLI plumbing: bad input is one 'error:' line and exit code 2."""

import errno
import logging
import multiprocessing
import re
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
from tqdm import tqdm

from mlssp_jax import cli
from mlssp_jax.errors import InputError


def test_input_error_becomes_exit_2(capsys):
    def main(argv):
        raise InputError("scan.nii: not a NIfTI file")

    assert cli.run_command(main, []) == 2
    assert capsys.readouterr().err == "error: scan.nii: not a NIfTI file\n"


def test_bad_option_is_one_error_line(capsys):
    parser = cli.ArgumentParser(prog="x")
    parser.add_argument("--fold", type=int, required=True)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--fold", "two"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--fold" in err


def test_success_returns_main_code():
    assert cli.run_command(lambda argv: None, []) == 0
    assert cli.run_command(lambda argv: 3, []) == 3


def test_absl_logs_only_warnings_unless_verbose():
    """Orbax logs every checkpoint save and restore at INFO through absl: quiet by default."""
    absl = logging.getLogger("absl")
    try:
        cli.setup_logging()
        assert not absl.isEnabledFor(logging.INFO) and absl.isEnabledFor(logging.WARNING)
        cli.setup_logging(verbose=True)
        assert absl.isEnabledFor(logging.DEBUG)
    finally:
        absl.setLevel(logging.NOTSET)


def test_error_line_starts_a_line_below_a_running_bar(capsys):
    def main(argv):
        bar = tqdm(total=4, desc="preprocess", file=sys.stderr)
        bar.update()
        raise InputError("scan.nii: expected a 3-D image")

    assert cli.run_command(main, []) == 2
    lines = capsys.readouterr().err.split("\n")
    assert "error: scan.nii: expected a 3-D image" in lines
    assert not tqdm._instances  # the bar was closed first


def test_an_error_message_stays_one_line(capsys):
    def main(argv):
        raise InputError("line 2: subject_id 'a\nb'")

    assert cli.run_command(main, []) == 2
    assert capsys.readouterr().err == "error: line 2: subject_id 'a\\nb'\n"


def test_a_failed_write_is_one_error_line_exit_1(capsys):
    def main(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "out/a.npz")

    assert cli.run_command(main, []) == 1
    assert capsys.readouterr().err == "error: out/a.npz: No space left on device\n"


def test_log_lines_print_above_a_running_bar(capsys):
    cli.setup_logging()
    with tqdm(total=2, desc="loop", file=sys.stderr) as bar:
        bar.update()
        logging.getLogger("mlssp_jax.test").info("subject done")
    err = capsys.readouterr().err
    # tqdm.write clears the bar's line (blanks, then \r) before the record, which ends its
    # line; the bar is redrawn below it
    assert re.search(r" \r\d\d:\d\d:\d\d INFO subject done\n\rloop:  50%", err), err


def _log_in_worker(message: str) -> None:
    logging.getLogger("mlssp_jax.worker").warning(message)


def test_worker_processes_log_through_this_process(capsys):
    cli.setup_logging()
    ctx = multiprocessing.get_context("spawn")
    with cli.worker_logging(ctx) as logs, \
            ProcessPoolExecutor(1, mp_context=ctx, **logs) as pool:
        pool.submit(_log_in_worker, "from the worker").result()
    assert "WARNING from the worker" in capsys.readouterr().err


def test_jax_backend_setup_is_quiet_unless_verbose(caplog):
    """``Unable to initialize backend 'tpu'`` (INFO, every CPU run) is not shown by default."""
    bridge = logging.getLogger("jax._src.xla_bridge")
    try:
        cli.setup_logging()
        with caplog.at_level(logging.INFO):
            bridge.info("Unable to initialize backend 'tpu'")
        assert "backend 'tpu'" not in caplog.text
        cli.setup_logging(verbose=True)
        assert bridge.isEnabledFor(logging.DEBUG)
    finally:
        bridge.setLevel(logging.NOTSET)
