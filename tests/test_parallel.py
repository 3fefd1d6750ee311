"""Data parallelism: one step on a global batch of 4 over 4 devices equals the 1-device step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from mlssp_jax import parallel
from mlssp_jax.errors import InputError

ROOT = Path(__file__).resolve().parent.parent

ONE_STEP_ON_1_AND_4_DEVICES = textwrap.dedent("""
    import json
    import jax
    import numpy as np
    from mlssp_jax import config as config_lib, parallel, train_step

    assert jax.device_count() == 4
    cfg = config_lib.from_dict({"data": {"voi_size": 16},
                                "model": {"width": 4, "dense_units": 8},
                                "train": {"batch_size": 4, "learning_rate": 1e-3}})
    rng = np.random.default_rng(0)
    batch = {"image": rng.random((4, 16, 16, 16, 1), dtype=np.float32),
             "mask": (rng.random((4, 16, 16, 16, 1)) > 0.7).astype(np.float32),
             "label": np.array([0, 1, 1, 0], np.float32)}
    out = {}
    for n in (1, 4):
        mesh = parallel.make_mesh(jax.devices()[:n])
        state = train_step.create_train_state(cfg, jax.random.key(0), mesh, 1)
        sharded = parallel.shard_batch(batch, mesh)
        shard_rows = {s.data.shape[0] for s in sharded["image"].addressable_shards}
        new, metrics = train_step.make_train_step(cfg, mesh, 1)(state, sharded)
        kernel = new.params["stem"]["conv0"]["kernel"]
        out[n] = {"shard_rows": sorted(shard_rows),
                  "param_devices": len(kernel.sharding.device_set),
                  "loss": float(metrics["loss"]),
                  "params": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(new.params)]}
        init = train_step.create_train_state(cfg, jax.random.key(0), mesh, 1).params
        out[n]["moved"] = float(np.abs(np.asarray(kernel)
                                       - np.asarray(init["stem"]["conv0"]["kernel"])).max())
    print(json.dumps(out))
""")


def test_one_step_on_four_devices_equals_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}  # + caches
    done = subprocess.run([sys.executable, "-c", ONE_STEP_ON_1_AND_4_DEVICES], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    one, four = out["1"], out["4"]
    assert (one["shard_rows"], four["shard_rows"]) == ([4], [1])  # batch split over 4 devices
    assert (one["param_devices"], four["param_devices"]) == (1, 4)  # params replicated
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert one["moved"] > 1e-4  # the step did change the parameters
    for a, b in zip(one["params"], four["params"], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_batch_must_split_over_the_devices():
    four_devices = types.SimpleNamespace(devices=np.empty(4))
    parallel.check_batch_size(12, four_devices)
    with pytest.raises(InputError, match="train.batch_size: 6 does not split over 4 devices"):
        parallel.check_batch_size(6, four_devices)


def test_multi_host_options_go_together():
    with pytest.raises(InputError, match="--coordinator"):
        parallel.initialize_distributed("127.0.0.1:1234", None, 0)
    with pytest.raises(InputError, match="--process-id"):
        parallel.initialize_distributed("127.0.0.1:1234", 2, 2)
