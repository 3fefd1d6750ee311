"""Data parallelism over every device of every host: a 1-D mesh, batch sharded, params replicated.

One jitted train step runs SPMD over the mesh (``jax.jit`` with shardings; not ``pmap``).
The global batch is split along the mesh axis ``"data"``; parameters and optimiser state
are replicated, and because the loss is a mean over the global batch, XLA inserts the
all-reduce that averages the gradients across devices. On several hosts each process
feeds only its own share of the global batch (:func:`shard_batch`). With one CPU device
the same code runs unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mlssp_jax.errors import InputError

DATA_AXIS = "data"


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, auto: bool = False) -> None:
    """Join a multi-host run with ``jax.distributed.initialize`` (call before any JAX work).

    ``coordinator`` ("host:port"), ``num_processes`` and ``process_id`` set it up by hand
    (e.g. several processes on one machine); ``auto=True`` lets JAX detect the cluster
    (Cloud TPU VMs, SLURM, or the ``JAX_COORDINATOR_ADDRESS`` environment variable).
    Does nothing when neither is given.
    """
    manual = (coordinator, num_processes, process_id)
    if all(v is None for v in manual) and not auto:
        return
    if not auto and any(v is None for v in manual):
        raise InputError("--coordinator, --num-processes and --process-id go together")
    if not auto and not 0 <= process_id < num_processes:
        raise InputError(f"--process-id: must be in 0..{num_processes - 1}, got {process_id}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    logging.info("process %d of %d, %d local and %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all hosts), axis ``"data"``.

    The axis is ``Auto``: shardings inside the model are left to the compiler.
    """
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of an array held whole on every device (params, optimiser state)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding of an array split along its leading (batch) axis over the mesh."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the devices (and so over the hosts)."""
    devices = mesh.devices.size
    if global_batch % devices:
        raise InputError(f"train.batch_size: {global_batch} does not split over {devices} "
                         f"devices; use a multiple of {devices}")


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble global batch arrays from every host's local share.

    Each value has this host's ``(b_local, ...)`` rows, ``b_local = B / process_count``;
    the result has shape ``(B, ...)`` sharded along the batch axis. Non-numeric entries
    (e.g. subject ids) are dropped.
    """
    sharding = batch_sharded(mesh)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in local_batch.items() if np.asarray(value).dtype.kind in "biuf"}


def is_main_process() -> bool:
    """True on the process that writes files (logs, metrics, eval.json, predictions)."""
    return jax.process_index() == 0
