"""Data parallelism with ``jax.sharding``: one 'data' mesh axis over every device.

The global batch (the config's ``batch_size``, whatever the device count) is
split along the mesh's 'data' axis; parameters, BatchNorm statistics and
optimizer state are replicated. Inside the jitted step XLA all-reduces what the
batch mean needs, so the loss, the gradient (and with it the ascent direction
of SAM/ASGA/SAQ) and the BatchNorm statistics of the clean pass are those of
the global batch: synchronized BatchNorm, the same numbers as on one device.

Several processes (hosts) each feed their own part of the global batch
(:func:`put_batch`); :func:`initialize_distributed` joins them first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis 'data' over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the 'data' axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_divisible(batch_size: int, mesh: Mesh, what: str = 'batch_size') -> None:
  """Raises a ValueError naming the fix when the batch does not split evenly."""
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ValueError(f'{what} ({batch_size}) must be a multiple of the number of devices ({n}); '
                     f'e.g. --config.{what}={max(n, batch_size // n * n)}.')


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's part of a global batch -> global arrays split over 'data'."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def state_shardings(state: Any, mesh: Mesh, fsdp: bool = False,
                    min_size: int = 2 ** 16) -> Any:
  """Shardings of a train state (arrays or shape structs): replicated, or FSDP-style.

  With ``fsdp``, every leaf of at least ``min_size`` elements is split along
  its largest axis that the device count divides (kernels, momenta); small
  leaves (biases, BatchNorm, logits, scalars) stay replicated. XLA gathers
  the parameters where the step needs them whole.
  """
  n = mesh.shape[DATA_AXIS]

  def one(x):
    shape = tuple(x.shape)
    if not fsdp or n == 1 or int(np.prod(shape)) < min_size:
      return replicated(mesh)
    axes = [a for a in np.argsort(shape)[::-1] if shape[a] % n == 0]
    if not axes:
      return replicated(mesh)
    spec = [None] * len(shape)
    spec[int(axes[0])] = DATA_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))

  return jax.tree.map(one, state)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """Copies ``tree`` (the same on every process, e.g. a loaded model) to every device of the mesh.

  Each device takes the host copy, so no process compares its copy with the
  others' (the NaN entries of a fresh optimizer state never would compare equal).
  """
  sharding = replicated(mesh)

  def put(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)


def _cluster_size_from_env() -> int:
  """Processes of a cluster launch that jax.distributed can auto-detect (else 1)."""
  for var in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    if os.environ.get(var, '1').isdigit() and int(os.environ.get(var, '1')) > 1:
      return int(os.environ[var])
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')  # set on every TPU-VM pod worker
  return len(hosts.split(',')) if hosts else 1


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-process run, before any other JAX call.

  Explicit arguments (e.g. two processes on one machine) take precedence;
  otherwise SLURM, Open MPI and TPU-VM pod launches are detected from the
  environment and left to ``jax.distributed.initialize()``; a single process
  does nothing.
  """
  if num_processes is not None and num_processes > 1:
    if coordinator_address is None or process_id is None:
      raise ValueError('a multi-process launch needs --coordinator_address=HOST:PORT, '
                       '--num_processes and --process_id (0 .. num_processes-1).')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif _cluster_size_from_env() > 1:
    jax.distributed.initialize()


def preemption_reached(step: int) -> bool:
  """True, on every process at the same ``step``, once any process got a preemption notice.

  JAX's preemption service (multi-process runs) catches SIGTERM on any host and
  agrees on the step at which all of them save. Call it at every step; with a
  single process it is always False (see ``loop.stop_on_signals`` there).
  """
  return multihost_utils.reached_preemption_sync_point(step)


def sync_processes(name: str) -> None:
  """Waits until every process reaches this point (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
