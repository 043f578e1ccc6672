r"""Evaluates one checkpoint and prints its metrics as one JSON line.

  python scripts/evaluate.py --config=configs/digits.py \
      --checkpoint=/tmp/perceiver_jax/digits [--split=test]

--checkpoint is a checkpoint directory (its newest complete step is used),
a series or a single step directory; local or gs://. The metrics are those
the training run's evaluation logs, over every example of the split.
--verbosity=0 (-v 0) adds the INFO lines of orbax, absl, JAX and TensorFlow
(see perceiver_jax/training/logs.py).
"""

import json

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

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Checkpoint path.')
_SPLIT = flags.DEFINE_string('split', None,
                             'Split to evaluate (default: the config\'s).')


def main(argv):
  del argv
  logs.configure()
  metrics = experiments.evaluate_checkpoint(_CONFIG.value, _CHECKPOINT.value,
                                           _SPLIT.value)
  print(json.dumps(metrics))


def run():
  """Console-script entry point (`perceiver-evaluate`)."""
  flags.mark_flags_as_required(['config', 'checkpoint'])
  app.run(main)


if __name__ == '__main__':
  run()
