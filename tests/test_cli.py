"""CLI plumbing: bad input is one 'error:' line and exit code 2."""

import logging

import pytest

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
