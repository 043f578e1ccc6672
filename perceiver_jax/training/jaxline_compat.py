"""Makes jaxline 0.0.8 (its last release) run on current JAX.

jaxline calls `jax.device_put_sharded` and `jax.tree_map`, both removed from
JAX. Rather than pinning an old JAX, we give jaxline equivalents built on the
current API. This is the only place that touches jaxline internals; import
jaxline through `import_jaxline()` (or call `install()` before first use).
"""

from typing import Any, Callable, Sequence

import jax
import numpy as np


def device_put_sharded(shards: Sequence[Any], devices: Sequence[jax.Device]):
  """Stacks `shards[i]` onto `devices[i]`: a pmap-ready array per leaf.

  Equivalent to the removed `jax.device_put_sharded`: every leaf of the result
  has a new leading axis of size len(devices), sharded one slice per device.
  """
  if len(shards) != len(devices):
    raise ValueError(
        f'{len(shards)} shards for {len(devices)} devices; they must match.')
  # pmap in current JAX consumes arrays sharded over a 1D mesh of `devices`.
  mesh = jax.sharding.Mesh(np.asarray(devices), ('devices',))
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('devices'))

  def stack(*xs):
    return jax.make_array_from_single_device_arrays(
        (len(devices),) + np.shape(xs[0]), sharding,
        [jax.device_put(np.asarray(x)[None], d) for x, d in zip(xs, devices)])

  return jax.tree.map(stack, *shards)


def install() -> None:
  """Adds the removed names to the `jax` module if they are missing."""
  for name, fn in (('device_put_sharded', device_put_sharded),
                   ('tree_map', jax.tree.map)):
    try:
      getattr(jax, name)
    except AttributeError:
      setattr(jax, name, fn)


def import_jaxline():
  """Returns the patched `jaxline` package (experiment, train, utils).

  `jaxline.platform` is left out: it defines the --config flag, which only
  the training entry point (scripts/train.py) may own.
  """
  install()
  import jaxline  # pylint: disable=g-import-not-at-top
  from jaxline import experiment  # pylint: disable=g-import-not-at-top,unused-import
  from jaxline import train  # pylint: disable=g-import-not-at-top,unused-import
  from jaxline import utils  # pylint: disable=g-import-not-at-top,unused-import
  return jaxline


def use_writer(platform: Any, create_writer: Callable[[Any, str], Any]
               ) -> None:
  """Makes `jaxline.platform.main` log through `create_writer(config, mode)`.

  jaxline's own factory writes with tf.summary; ours
  (training/tensorboard.py) writes the same event files through epath.
  """
  platform.create_writer = create_writer
