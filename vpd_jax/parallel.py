"""Device mesh, sharding rules and multi-host start-up.

The mesh has two axes: ``data`` (pure data parallelism) and ``fsdp`` (data parallelism whose devices also
split the large parameter and optimizer tensors). Batches are split over both axes together. Parameters,
batch statistics and optimizer state are sharded by one shape rule (``fsdp_spec``), so Adam's moments land
exactly where their parameters are. Imports only jax and numpy.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)
# Tensors below this many elements are replicated: sharding them saves little memory and costs a
# collective each. 2**18 fp32 elements = 1 MiB; the SD UNet's large convs/projections are far above it.
DEFAULT_FSDP_MIN_SIZE = 2**18

log = logging.getLogger(__name__)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Starts ``jax.distributed`` when this is one process of several; returns whether it did.

    Order of precedence: explicit arguments; then the environment variables ``VPD_COORDINATOR_ADDRESS``
    (``host:port``), ``VPD_NUM_PROCESSES``, ``VPD_PROCESS_ID``; then a cluster jax can detect by itself
    (SLURM, Open MPI, Cloud TPU, ...), in which case ``jax.distributed.initialize()`` is called with no
    arguments. Otherwise this is a single-process run and nothing happens. Must run before any other jax
    call that touches devices. Multi-process CPU runs use jax's default CPU collectives (gloo).
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("VPD_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("VPD_NUM_PROCESSES"):
        num_processes = int(env["VPD_NUM_PROCESSES"])
    if process_id is None and env.get("VPD_PROCESS_ID"):
        process_id = int(env["VPD_PROCESS_ID"])

    if coordinator_address is not None:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs num_processes and process_id too")
        if num_processes <= 1:
            return False
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
        )
        return True

    cluster_markers = (
        int(env.get("SLURM_NTASKS", "1")) > 1,
        int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1,
        "TPU_WORKER_HOSTNAMES" in env and "," in env["TPU_WORKER_HOSTNAMES"],
    )
    if any(cluster_markers):
        jax.distributed.initialize(local_device_ids=local_device_ids)
        return True
    return False


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all). ``-1`` on one axis takes what is left."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of data and fsdp may be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not cover the {n} devices")
    try:
        # Topology-aware order (ICI rings on TPU/GPU) and process-contiguous blocks on several hosts.
        grid = mesh_utils.create_device_mesh((data, fsdp), devices)
    except Exception as e:  # noqa: BLE001 (any device set create_device_mesh cannot lay out)
        _say_once(f"device mesh: create_device_mesh could not lay out {n} devices as {data}x{fsdp} "
                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); using their plain order")
        grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    # Auto axes: shardings propagate through the model by GSPMD; jax.make_mesh would default to Explicit.
    return Mesh(grid, (DATA, FSDP), axis_types=(AxisType.Auto, AxisType.Auto))


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """A fallback is logged once per process (as a warning), never silently taken."""
    if message not in _SAID:
        _SAID.add(message)
        logging.getLogger("vpd_jax").warning(message)


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
    """Shard the largest axis divisible by ``fsdp_size`` over ``fsdp``; replicate small or indivisible tensors.

    Ties go to the later axis (output channels of conv kernels and dense layers).
    """
    if fsdp_size <= 1 or math.prod(shape) < min_size:
        return P()
    candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0 and d >= fsdp_size]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: (shape[i], i))
    spec = [None] * len(shape)
    spec[axis] = FSDP
    return P(*spec)


def state_shardings(abstract_tree, mesh: Mesh, min_size: int = DEFAULT_FSDP_MIN_SIZE):
    """``NamedSharding`` for every leaf of a tree of arrays or ``jax.ShapeDtypeStruct`` (from eval_shape)."""
    fsdp_size = mesh.shape[FSDP]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size, min_size)), abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
    return mesh.shape[DATA] * mesh.shape[FSDP]


def shard_batch(batch, mesh: Mesh):
    """Host arrays -> global arrays split on the batch axis.

    When the mesh lives in this process alone, ``batch`` is the global batch. When it spans several
    processes, each passes only its own rows (global batch / number of processes in the mesh, in process
    order) and jax assembles the global array without copying data between hosts.
    """
    sharding = batch_sharding(mesh)
    if not mesh.is_multi_process:
        return jax.device_put(batch, sharding)
    n_proc = len({d.process_index for d in mesh.devices.flat})
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), (x.shape[0] * n_proc, *x.shape[1:])),
        batch,
    )
