"""Command-line flags that start multi-host JAX, shared by the entry points.

scripts/train.py and scripts/evaluate.py take the same flags:

  --coordinator_address=HOST:PORT --num_processes=N --process_id=I  (each host)
  --distributed  (alone: JAX discovers the cluster, e.g. a Cloud TPU pod)

or the config's `distributed` section (configs/common.py). Importing this
module defines the flags (absl), so only entry points import it; the
library's side is `parallel.initialize_distributed`.
"""

from typing import Optional

from absl import flags
import ml_collections

from perceiver_jax.training import parallel

DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize (auto-detects the '
    'cluster on Cloud TPU / SLURM when no address is given).')
COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0 (multi-host).')
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                     'Number of processes (multi-host).')
PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                  'Index of this process (multi-host).')


def maybe_initialize(config: Optional[ml_collections.ConfigDict]) -> bool:
  """Starts jax.distributed if the flags or `config.distributed` ask for it.

  Call before any other JAX call. Flags override the config's
  `distributed` section (enabled, coordinator_address, num_processes,
  process_id); the config's num_processes and process_id only count with an
  address, since on a pod JAX finds them itself.

  Returns:
    Whether jax.distributed was initialised.
  """
  dist = (config.get('distributed') if config is not None else None) or {}
  address = COORDINATOR.value or dist.get('coordinator_address') or None
  if not (DISTRIBUTED.value or dist.get('enabled') or address):
    return False
  num = NUM_PROCESSES.value or (dist.get('num_processes') if address else None)
  pid = PROCESS_ID.value
  if pid is None and address:
    pid = dist.get('process_id')
  parallel.initialize_distributed(address, num, pid)
  return True
