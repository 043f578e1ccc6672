r"""Trains or evaluates a Perceiver: the one entry point.

  python scripts/train.py --config=configs/digits.py[:presets] \
      [--config.training.batch_size=64 ...] \
      [--jaxline_mode=train|eval|train_eval_multithreaded]

The config names the experiment class and the checkpoint directory
(`--config.checkpoint_dir`). Restarting the same command resumes from the
latest checkpoint there; SIGTERM/SIGINT saves before exiting. `eval` mode
evaluates checkpoints as they appear in the directory.

Multi-host: pass --coordinator_address=HOST:PORT --num_processes=N
--process_id=I on every host (or set config.distributed.*); on Cloud TPU,
--distributed alone lets JAX discover the pod (flags shared with
scripts/evaluate.py: perceiver_jax/training/distributed_flags.py). A run
may resume on another number of hosts: the checkpoint holds no per-host
state (see tests/experiments/test_multihost.py).

It prints progress (step, loss, steps/sec, ETA every
`training.log_every_steps`), evaluation results and warnings;
--verbosity=0 (-v 0) adds the INFO lines of jaxline, orbax, absl, JAX and
TensorFlow, 1 adds DEBUG (see perceiver_jax/training/logs.py).

Safety of the checkpoint directory (perceiver_jax/training/checkpointing.py):
a training run holds `<checkpoint_dir>/run.lock`, so a second run on the same
directory refuses, naming the first; resuming with a config that changes the
trajectory (seed, schedule, steps, batch, model, data) is refused with the
diff unless --allow_config_change; a directory whose checkpoints are all
damaged is not silently restarted from scratch unless --allow_fresh_start.
Checkpoint failures print one line naming the file and exit 1 (the traceback
with --verbosity).
"""

import atexit
import sys

from perceiver_jax.training import logs

# Before TensorFlow and XLA load: they read their C++ log level once.
logs.quiet_native_logs(load_tensorflow=True)  # jaxline.platform loads it.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging as absl_logging

from perceiver_jax.training import jaxline_compat

jaxline = jaxline_compat.import_jaxline()
from jaxline import platform

from perceiver_jax.training import tensorboard

jaxline_compat.use_writer(platform, tensorboard.create_writer)

import experiments
import jax
from perceiver_jax.training import checkpoint_integrity
from perceiver_jax.training import checkpointing
from perceiver_jax.training import distributed_flags
from perceiver_jax.training import preemption
from perceiver_jax.training import run_lock

_LOG = logs.get_logger('scripts.train')

_ALLOW_FRESH_START = flags.DEFINE_bool(
    'allow_fresh_start', False, 'Train from step 0 even where checkpoint_dir '
    'holds damaged checkpoints that were moved aside.')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False, 'Resume even if the config changes the '
    'training trajectory (seed, schedule, steps, batch, model, data).')


def _checkpointer_factory():
  overrides = {}
  if _ALLOW_FRESH_START.value:
    overrides['checkpoint_allow_fresh_start'] = True
  if _ALLOW_CONFIG_CHANGE.value:
    overrides['checkpoint_allow_config_change'] = True
  if not overrides:
    return checkpointing.make_checkpointer
  return checkpointing.make_checkpointer_factory(**overrides)


def _no_tracebacks(record) -> bool:
  """Drops the traceback jaxline logs with a failed activity ('checkpoint
  save failed with error.'): the error itself follows as one line."""
  record.exc_info, record.exc_text = None, None
  return True


def main(argv):
  logs.configure()
  if not flags.FLAGS['verbosity'].present:
    absl_logging.get_absl_handler().addFilter(_no_tracebacks)
  config = flags.FLAGS['config'].value
  distributed_flags.maybe_initialize(config)
  experiment_class = experiments.get_experiment_class(
      config.experiment_kwargs.config.experiment)
  lock = None
  if (flags.FLAGS['jaxline_mode'].value.startswith('train') and
      config.get('checkpoint_dir') and jax.process_index() == 0):
    lock = run_lock.RunLock(config.checkpoint_dir)
  try:
    if lock is not None:
      lock.acquire()
      atexit.register(lock.release)  # Also on sys.exit from a library.
    preemption.install_signal_handlers()
    platform.main(experiment_class, argv,
                  checkpointer_factory=_checkpointer_factory())
  except checkpoint_integrity.CheckpointError as e:
    if flags.FLAGS['verbosity'].present:
      raise
    _LOG.error('%s', e)  # One line; the traceback with --verbosity.
    sys.exit(1)
  finally:
    if lock is not None:
      lock.release()
  if preemption.stop_requested():
    sys.exit(143)  # Preempted: saved; the same command resumes.


def run():
  """Console-script entry point (`perceiver-train`)."""
  flags.mark_flag_as_required('config')
  app.run(main)


if __name__ == '__main__':
  run()
