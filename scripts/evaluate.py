r"""Evaluates one checkpoint and prints its metrics as one JSON line.

  python scripts/evaluate.py --config=configs/digits.py \
      --checkpoint=/tmp/perceiver_jax/digits [--split=test]

--checkpoint is a checkpoint directory (its newest complete step is used),
a series or a single step directory; local or gs://. The metrics are those
the training run's evaluation logs, over every example of the split.
--verbosity=0 (-v 0) adds the INFO lines of orbax, absl, JAX and TensorFlow
(see perceiver_jax/training/logs.py).

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
from perceiver_jax.training import checkpoint_integrity

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Checkpoint path.')
_SPLIT = flags.DEFINE_string('split', None,
                             'Split to evaluate (default: the config\'s).')


def main(argv):
  del argv
  logs.configure()
  try:
    metrics = experiments.evaluate_checkpoint(
        _CONFIG.value, _CHECKPOINT.value, _SPLIT.value)
  except checkpoint_integrity.CheckpointError as e:
    if flags.FLAGS['verbosity'].present:
      raise
    sys.exit(f'evaluate.py: {e}')  # One line naming the files; exit 1.
  problem = nonfinite_message(metrics, _CHECKPOINT.value)
  if problem:
    sys.exit(problem)  # Exit status 1; the message on stderr.
  print(json.dumps(metrics))


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
  flags.mark_flags_as_required(['config', 'checkpoint'])
  app.run(main)


if __name__ == '__main__':
  run()
