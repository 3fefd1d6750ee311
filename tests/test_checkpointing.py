"""Checkpoints: latest + best kept, exact restore, and a save killed midway leaves the last one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from mlssp_jax import checkpointing


@struct.dataclass
class State:
    """Stand-in with the fields of ``train_step.TrainState``."""

    step: Any
    params: Any
    log_vars: Any
    opt_state: Any
    ema_params: Any = None


def make_state(value: float, size: int = 6) -> State:
    params = {"dense": {"kernel": jnp.full((size, 3), value), "bias": jnp.arange(3.0) * value}}
    log_vars = jnp.array([value, -value])
    opt_state = optax.adam(1e-3).init({"params": params, "log_vars": log_vars})
    return State(jnp.asarray(int(value * 10), jnp.int32), params, log_vars, opt_state)


def assert_trees_equal(a: Any, b: Any) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_keeps_latest_and_best_and_restores_exactly(tmp_path):
    manager = checkpointing.open_manager(tmp_path / "ckpt")
    for epoch, score in [(1, 0.5), (2, 0.9), (3, 0.7), (4, 0.6)]:
        checkpointing.save(manager, epoch, make_state(epoch), {"record": {"epoch": epoch}}, score)
    manager.wait_until_finished()
    assert sorted(manager.all_steps()) == [2, 4]
    assert (manager.best_step(), manager.latest_step()) == (2, 4)

    state, meta = checkpointing.restore(manager, 4, make_state(0.0))
    assert_trees_equal(state, make_state(4))
    assert meta == {"record": {"epoch": 4}}
    params, _ = checkpointing.restore_params(manager, 2, make_state(0.0).params)
    assert_trees_equal(params, make_state(2).params)
    manager.close()


def test_a_moving_average_is_saved_as_the_params_and_restored_beside_the_online_ones(tmp_path):
    online = make_state(3.0)
    state = online.replace(ema_params=make_state(2.0).params)
    manager = checkpointing.open_manager(tmp_path / "ckpt")
    checkpointing.save(manager, 1, state, {"record": {"epoch": 1}}, 0.5)
    manager.wait_until_finished()
    # what evaluation and predict read is the average
    params, _ = checkpointing.restore_params(manager, 1, online.params)
    assert_trees_equal(params, make_state(2.0).params)
    # resuming gets both back, each in its place
    like = make_state(0.0).replace(ema_params=make_state(0.0).params)
    restored, _ = checkpointing.restore(manager, 1, like)
    assert_trees_equal(restored.params, online.params)
    assert_trees_equal(restored.ema_params, make_state(2.0).params)
    assert_trees_equal(restored.opt_state, online.opt_state)
    manager.close()


def test_leftover_partial_save_is_ignored_and_cleaned(tmp_path):
    directory = tmp_path / "ckpt"
    manager = checkpointing.open_manager(directory)
    checkpointing.save(manager, 1, make_state(1), {"record": {}}, 0.5)
    manager.close()
    partial = directory / "2.orbax-checkpoint-tmp-1234567"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "junk").write_bytes(b"\0" * 100)

    manager = checkpointing.open_manager(directory)
    assert manager.latest_step() == 1
    state, _ = checkpointing.restore(manager, 1, make_state(0.0))
    assert_trees_equal(state, make_state(1))
    assert not partial.exists()
    manager.close()


SAVE_FOREVER = textwrap.dedent("""
    import sys
    import jax.numpy as jnp
    import optax
    sys.path.insert(0, sys.argv[2])
    from test_checkpointing import make_state
    from mlssp_jax import checkpointing
    manager = checkpointing.open_manager(sys.argv[1])
    for epoch in range(1, 1000):
        checkpointing.save(manager, epoch, make_state(epoch, size=4_000_000), {"e": epoch}, -epoch)
        manager.wait_until_finished()
""")


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    """Kill a process while it writes checkpoint k >= 2 (its temporary exists); k-1 survives."""
    directory = tmp_path / "ckpt"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(directory),
                             str(Path(__file__).parent)], env=env, cwd=Path(__file__).parent.parent)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            names = {p.name for p in directory.glob("*")} if directory.exists() else set()
            if any(".orbax-checkpoint-tmp" in n and not n.startswith("1.") for n in names):
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert any(".orbax-checkpoint-tmp" in p.name for p in directory.glob("*")), "no save caught"

    manager = checkpointing.open_manager(directory)
    latest = manager.latest_step()
    assert latest is not None and latest >= 1
    state, meta = checkpointing.restore(manager, latest, make_state(0.0, size=4_000_000))
    assert meta == {"e": latest}
    assert_trees_equal(state, make_state(latest, size=4_000_000))
    manager.close()
