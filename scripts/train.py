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
--distributed alone lets JAX discover the pod.

It prints progress (step, loss, steps/sec, ETA every
`training.log_every_steps`), evaluation results and warnings;
--verbosity=0 (-v 0) adds the INFO lines of jaxline, orbax, absl, JAX and
TensorFlow, 1 adds DEBUG (see perceiver_jax/training/logs.py).
"""

import sys

from perceiver_jax.training import logs

# Before TensorFlow and XLA load: they read their C++ log level once.
logs.quiet_native_logs(load_tensorflow=True)  # jaxline.platform loads it.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags

from perceiver_jax.training import jaxline_compat

jaxline = jaxline_compat.import_jaxline()
from jaxline import platform

import experiments
from perceiver_jax.training import checkpointing
from perceiver_jax.training import parallel
from perceiver_jax.training import preemption

_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize (auto-detects the '
    'cluster on Cloud TPU / SLURM when no address is given).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0 (multi-host).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Number of processes (multi-host).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'Index of this process (multi-host).')


def _maybe_initialize_distributed(config) -> None:
  dist = config.distributed
  address = _COORDINATOR.value or dist.coordinator_address or None
  if not (_DISTRIBUTED.value or dist.enabled or address):
    return
  num = _NUM_PROCESSES.value or (dist.num_processes if address else None)
  pid = _PROCESS_ID.value
  if pid is None and address:
    pid = dist.process_id
  parallel.initialize_distributed(address, num, pid)


def main(argv):
  logs.configure()
  config = flags.FLAGS['config'].value
  _maybe_initialize_distributed(config)
  experiment_class = experiments.get_experiment_class(
      config.experiment_kwargs.config.experiment)
  preemption.install_signal_handlers()
  platform.main(experiment_class, argv,
                checkpointer_factory=checkpointing.make_checkpointer)
  if preemption.stop_requested():
    sys.exit(143)  # Preempted: saved; the same command resumes.


def run():
  """Console-script entry point (`perceiver-train`)."""
  flags.mark_flag_as_required('config')
  app.run(main)


if __name__ == '__main__':
  run()
