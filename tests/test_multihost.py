"""Multi-host: two local processes (jax.distributed on 127.0.0.1, 2 CPU devices each) train one
epoch and agree with the single-process, single-device reference run."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest
from helpers import ROOT, train_command, train_env

from mlssp_jax import rundir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_two_devices_each_match_one_process(tiny_run, tiny_config, tiny_cohort,
                                                          tmp_path):
    workdir, port = tmp_path / "multihost_run", free_port()
    env = train_env(devices=2)
    procs = [subprocess.Popen(
        train_command(tiny_config, tiny_cohort, workdir, "--epochs", "1",
                      "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                      "--process-id", str(i)),
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    [multi] = rundir.read_jsonl(workdir / "fold_0" / "metrics.jsonl")
    assert (multi["processes"], multi["devices"]) == (2, 4)
    single = rundir.read_jsonl(tiny_run / "fold_0" / "metrics.jsonl")[0]
    for key in ("step", "lr", "train_loss", "dice", "bce", "val_dsc", "val_score"):
        assert multi[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
    result = json.loads((workdir / "fold_0" / "eval.json").read_text())
    assert result["segmentation"]["dsc"] is not None
