"""Devices and hosts: data-parallel layout, replication, jax.distributed.

Data parallelism is one `jax.pmap` axis (AXIS_NAME) over every device of
every host; each host feeds its local devices a [local_devices,
per_device_batch, ...] slice of the global batch.
"""

from typing import Any, Optional

from absl import logging
import jax
import numpy as np

AXIS_NAME = 'devices'


def batch_dims(global_batch_size: int, what: str = 'batch_size'
               ) -> tuple[int, int]:
  """(local_devices, per_device_batch) for a global batch over all devices.

  Raises:
    ValueError: if the global batch does not divide across all devices.
  """
  num_devices = jax.device_count()
  if global_batch_size < 1 or global_batch_size % num_devices:
    raise ValueError(
        f'{what}={global_batch_size} must be a positive multiple of the '
        f'{num_devices} devices ({jax.process_count()} host(s) x '
        f'{jax.local_device_count()} local devices).')
  return jax.local_device_count(), global_batch_size // num_devices


def replicate(tree: Any) -> Any:
  """Copies every leaf onto each local device: [local_devices, ...]."""
  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS_NAME,))
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(AXIS_NAME))

  def put(x):
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_single_device_arrays(
        (len(devices),) + x.shape, sharding,
        [jax.device_put(x[None], d) for d in devices])

  return jax.tree.map(put, tree)


def _first_copy(x: Any) -> np.ndarray:
  """Row 0 of a [local devices, ...] leaf, read from its first shard.

  `x[0]` would be an eager gather over the array's devices; in a
  multi-process run that computation can wait forever (seen on CPU with
  gloo), while reading one addressable shard computes nothing.
  """
  if isinstance(x, jax.Array) and not isinstance(
      x, jax.core.Tracer) and x.addressable_shards:
    shard = min(x.addressable_shards, key=lambda s: s.device.id)
    data = np.asarray(shard.data)
    if data.ndim == x.ndim:  # [1, ...]: the device axis is kept.
      return data[0]
    return data
  return np.asarray(x)[0]


def unreplicate(tree: Any) -> Any:
  """The first local device's copy of every leaf, as host NumPy."""
  return jax.tree.map(_first_copy, tree)


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Starts multi-host JAX; call before any other JAX call.

  With no arguments JAX discovers the cluster itself (Cloud TPU, SLURM).
  On CPU, processes talk through gloo collectives (e.g. several processes on
  127.0.0.1 for tests).
  """
  # Only affects CPU devices; accelerators use their own collectives.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id)
  logging.info('jax.distributed: process %d of %d, %d local / %d devices.',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def all_devices(flag: jax.Array) -> jax.Array:
  """Whether boolean scalar `flag` holds on every device of every host.

  Call inside a function pmapped over AXIS_NAME: every device gets the same
  answer, so a decision taken on it (e.g. skipping a non-finite update)
  keeps the replicas identical.
  """
  return jax.lax.pmin(flag.astype(np.int32), AXIS_NAME) > 0
