"""Many processes, one run (JAX's multi-controller runtime, `jax.distributed`).

Every process runs the same program on its own devices; a global array spans all of them. What
fido does per process:
  maybe_initialize_distributed   jax.distributed.initialize() from config.sharding.distributed or
                                 JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
  process_batch_size             this process's rows of a global batch (the data axis must split
                                 over the processes)
  process_rows                   this process's rows of a global output (sharding.make_global_batch
                                 builds the global input from them)
  sync / allgather_json / agree  a barrier; small JSON values from every process, or process 0's,
                                 through the devices' collectives (no shared filesystem needed)
  is_primary                     process 0: the one that writes shared files (metrics, predictions)
Single-process, each of these is the trivial answer, with no collective.
"""

import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from fido.config import ConfigError
from fido.sharding import DATA, batch_sharding

_LOG = logging.getLogger(__name__)


def maybe_initialize_distributed(config: ml_collections.ConfigDict | None) -> bool:
  """Calls jax.distributed.initialize() when multi-host is configured; returns whether it did.

  `config` is the `config.sharding.distributed` section. Each unset field falls back to the
  environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); multi-host is
  configured when `enabled` is set, a coordinator address is known, or num_processes > 1. Fields
  still unset are left to JAX's cluster auto-detection. Call it before anything touches a device.
  """
  config = config or ml_collections.ConfigDict()

  def setting(field, env, cast):
    value = config.get(field)
    if value is None and os.environ.get(env):
      value = cast(os.environ[env])
    return value

  address = setting('coordinator_address', 'JAX_COORDINATOR_ADDRESS', str)
  num_processes = setting('num_processes', 'JAX_NUM_PROCESSES', int)
  process_id = setting('process_id', 'JAX_PROCESS_ID', int)
  wanted = bool(config.get('enabled')) or address is not None or (num_processes or 1) > 1
  if not wanted or jax.distributed.is_initialized():
    return False
  _LOG.info('jax.distributed.initialize(coordinator_address=%s, num_processes=%s, process_id=%s)',
            address, num_processes, process_id)
  jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                             process_id=process_id)
  return True


def is_primary() -> bool:
  """Whether this is process 0, the one that writes files every process would write alike."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process gets here (a no-op single-process); `name` tells barriers apart."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def allgather_json(value: Any) -> list[Any]:
  """Every process's JSON-able `value`, in process order (`[value]` single-process).

  Goes through the devices' collectives as bytes: no shared filesystem is needed. JSON keeps
  floats exact (repr round-trips), so every process computes the same metrics from the result.
  """
  if jax.process_count() == 1:
    return [value]
  blob = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int32))).ravel()
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  blobs = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(b[:n]).decode()) for b, n in zip(blobs, sizes)]


def agree(value: Any) -> Any:
  """Process 0's JSON-able `value` on every process (e.g. the steps a watcher sees)."""
  return allgather_json(value)[0]


def process_batch_size(batch_size: int, mesh: Mesh) -> int:
  """This process's rows of a global batch of at least `batch_size` rows (rounded up so that
  every process holds whole shards of the data axis).

  Each process feeds only its own rows (make_global_batch), which needs the mesh's data axis to
  split over the processes: a model axis reaching across processes is an error.
  """
  count, data = jax.process_count(), mesh.shape[DATA]
  if data % count:
    raise ConfigError(f'the mesh {dict(mesh.shape)} has a data axis of {data}, not a multiple of '
                      f'the {count} processes: each process must hold whole data shards (keep '
                      'config.sharding.mesh.model within one process\'s devices)')
  shards = data // count  # data shards on each process
  per_process = -(-batch_size // count)
  return -(-per_process // shards) * shards


def process_rows(array: jax.Array, mesh: Mesh) -> np.ndarray:
  """This process's rows of a global array whose leading axis is the batch, in the order its
  rows went into make_global_batch (the inverse of it; every row when single-process)."""
  if jax.process_count() == 1:
    return np.asarray(array)
  array = jax.device_put(array, batch_sharding(mesh))
  shards = {shard.index[0].start or 0: shard.data for shard in array.addressable_shards}
  return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])
