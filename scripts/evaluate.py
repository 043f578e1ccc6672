r"""Evaluates one checkpoint and prints its metrics as one JSON line.

  python scripts/evaluate.py --config=configs/digits.py \
      --checkpoint=/tmp/perceiver_jax/digits [--split=test]

--checkpoint is a checkpoint directory (its newest complete step is used),
a series or a single step directory; local or gs://. The metrics are those
the training run's evaluation logs, over every example of the split.
--verbosity=0 (-v 0) adds the INFO lines of orbax, absl, JAX and TensorFlow
(see perceiver_jax/training/logs.py).

Multi-host: the flags of scripts/train.py (--coordinator_address=HOST:PORT
--num_processes=N --process_id=I on every host, or --distributed alone on
Cloud TPU; perceiver_jax/training/distributed_flags.py). Each host reads its
own shard of the split, the metrics are summed over all hosts so that every
example counts once, and only process 0 prints them.

A damaged or missing checkpoint prints one line naming the files and exits 1
(the traceback with --verbosity).

A non-finite loss or metric (a diverged checkpoint) is not a result: the
script prints one line naming the checkpoint step and exits 1.
"""

import json
import math
import sys
from typing import Any, Mapping, Optional

from perceiver_jax.training import logs

# Before TensorFlow and XLA load: they read their C++ log level once.
logs.quiet_native_logs()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from ml_collections import config_flags

from perceiver_jax.training import jaxline_compat

jaxline_compat.install()
import experiments
import jax
from perceiver_jax.training import checkpoint_integrity
from perceiver_jax.training import distributed_flags


def _define_flags() -> None:
  """This script's own flags, defined when it runs rather than on import:
  other scripts that tests import (scripts/import_checkpoint.py) also
  define --config, and absl refuses a second definition."""
  config_flags.DEFINE_config_file('config', None, 'Config file.')
  flags.DEFINE_string('checkpoint', None, 'Checkpoint path.')
  flags.DEFINE_string('split', None,
                      'Split to evaluate (default: the config\'s).')
  flags.mark_flags_as_required(['config', 'checkpoint'])


def main(argv):
  del argv
  logs.configure()
  config = flags.FLAGS['config'].value
  distributed_flags.maybe_initialize(config)  # Before any other JAX call.
  sys.exit(report(config, flags.FLAGS['checkpoint'].value,
                  flags.FLAGS['split'].value,
                  verbose=flags.FLAGS['verbosity'].present))


def report(config, checkpoint: str, split: Optional[str] = None, *,
           verbose: bool = False) -> int:
  """Evaluates `checkpoint` and prints the outcome; returns the exit status.

  Prints the metrics as one JSON line on stdout (process 0 only: every host
  holds the same, all-host totals). A checkpoint error prints one line on
  stderr on each host that meets it, and a non-finite metric one line on
  process 0; both return 1.

  Raises:
    checkpoint_integrity.CheckpointError: if `verbose`, for the traceback.
  """
  try:
    # stdout holds the metrics line alone: native code prints there (gloo,
    # the collectives of multi-host CPU runs, announces each connection).
    with logs.fd_redirected(1, 2):
      metrics = experiments.evaluate_checkpoint(config, checkpoint, split)
  except checkpoint_integrity.CheckpointError as e:
    if verbose:
      raise
    one_line = ' '.join(str(e).splitlines())  # Names the files.
    print(f'evaluate.py: {one_line}', file=sys.stderr)
    return 1
  primary = jax.process_index() == 0
  problem = nonfinite_message(metrics, checkpoint)
  if problem:
    if primary:
      print(problem, file=sys.stderr)
    return 1
  if primary:
    print(json.dumps(metrics), flush=True)
  return 0


def nonfinite_message(metrics: Mapping[str, Any],
                      checkpoint: str) -> Optional[str]:
  """One line naming the non-finite metrics of `metrics` (from
  experiments.evaluate_checkpoint) and the checkpoint step; None if all
  are finite."""
  bad = {k: v for k, v in metrics.items()
         if isinstance(v, float) and not math.isfinite(v)}
  if not bad:
    return None
  listed = ', '.join(f'{k}={v}' for k, v in sorted(bad.items()))
  return (f'evaluate.py: checkpoint step {metrics["step"]} of {checkpoint} '
          f'gives non-finite {listed}: its parameters diverged; evaluate an '
          'earlier step (a step directory such as <dir>/latest/<step>).')


def run():
  """Console-script entry point (`perceiver-evaluate`)."""
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
