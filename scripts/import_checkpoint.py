r"""Converts a released checkpoint into a perceiver_jax checkpoint.

  python scripts/import_checkpoint.py --format=deepmind \
      --input=imagenet_fourier_position_encoding.pystate \
      --config=configs/imagenet.py:p2 --output=/tmp/perceiver_jax/p2_deepmind
  python scripts/evaluate.py --config=configs/imagenet.py:p2 \
      --checkpoint=/tmp/perceiver_jax/p2_deepmind

--format=deepmind reads DeepMind's Perceiver IO ImageNet .pystate files
(perceiver_jax/interop/deepmind.py: the name table, what is checked, and
which released variants a config of ours can hold). The output is a
checkpoint root (local or gs://) holding one step, latest/0: the converted
parameters and the config's optimizer state as initialised for them (the
experiment restores both). The output must not hold checkpoints already.
Prints one JSON line: the step directory and the parameter count.

The file is unpickled with a restricted unpickler that refuses any global
beyond NumPy's array reconstruction; --allow_unsafe_pickle lifts that, and
then the file can run arbitrary code: only for files you trust.
"""

import json

from perceiver_jax.training import logs

# Before TensorFlow and XLA load: they read their C++ log level once.
logs.quiet_native_logs()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from perceiver_jax.training import jaxline_compat

jaxline_compat.install()
import experiments
from perceiver_jax import models
from perceiver_jax.interop import deepmind
from perceiver_jax.training import checkpointing
from perceiver_jax.training import optimizers
from perceiver_jax.training import tree_io

FORMATS = ('deepmind',)
# What the experiments keep in a checkpoint (their CHECKPOINT_ATTRS).
_CHECKPOINT_ATTRS = {'_params': 'params', '_opt_state': 'opt_state'}

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_FORMAT = flags.DEFINE_enum('format', 'deepmind', FORMATS,
                            'Format of --input.')
_INPUT = flags.DEFINE_string('input', None, 'Checkpoint file to import.')
_OUTPUT = flags.DEFINE_string('output', None,
                              'Checkpoint directory to create.')
_ALLOW_UNSAFE_PICKLE = flags.DEFINE_bool(
    'allow_unsafe_pickle', False,
    'Unpickle --input without restrictions (runs any code it names).')


class _Snapshot:
  """What tree_io.write_step saves: the experiment's snapshot_state()."""

  def __init__(self, state):
    self._state = state

  def snapshot_state(self):
    return self._state


def import_checkpoint(config: ml_collections.ConfigDict, input_path: str,
                      output_dir: str, *, fmt: str = 'deepmind',
                      allow_unsafe_pickle: bool = False) -> dict:
  """Writes `input_path` as step 0 of a new checkpoint root `output_dir`.

  Args:
    config: the experiment config (as --config gives it).
    input_path: the released checkpoint.
    output_dir: checkpoint root to write; must hold no complete step.
    fmt: format of `input_path`, one of FORMATS.
    allow_unsafe_pickle: see perceiver_jax.interop.deepmind.read_pystate.

  Returns:
    {'step_dir': the directory written, 'params': the parameter count}.

  Raises:
    ValueError: for an unknown format, or an experiment that checkpoints
      other attributes.
    FileExistsError: if `output_dir` already holds checkpoints.
    deepmind.CheckpointError, deepmind.CheckpointMismatch: for an unreadable
      file or one that does not fit the config's model.
  """
  if fmt not in FORMATS:
    raise ValueError(f'Unknown format {fmt!r}; expected one of {FORMATS}.')
  exp = config.experiment_kwargs.config
  attrs = experiments.get_experiment_class(exp.experiment).CHECKPOINT_ATTRS
  if attrs != _CHECKPOINT_ATTRS:
    raise ValueError(f'Experiment {exp.experiment!r} checkpoints {attrs}; '
                     f'this script writes {_CHECKPOINT_ATTRS}.')
  series = tree_io.as_path(output_dir) / checkpointing.LATEST
  if tree_io.complete_steps(series):
    raise FileExistsError(
        f'{output_dir} already holds checkpoints ({series}: steps '
        f'{tree_io.complete_steps(series)}); choose a new directory.')
  params, model_state = deepmind.load_checkpoint(
      input_path, exp.model, input_shape=exp.data.input_shape,
      allow_unsafe_pickle=allow_unsafe_pickle)
  # The optimizer's state has the same structure for any schedule length;
  # these are the experiment's arguments nonetheless.
  optimizer, _ = optimizers.make_optimizer(
      exp.optimizer,
      steps_per_epoch=max(
          1, exp.data.num_train_examples // exp.training.batch_size),
      total_steps=exp.training.total_steps)
  state = ml_collections.ConfigDict()
  state.global_step = 0
  snapshot = {'params': params, 'opt_state': optimizer.init(params)}
  if models.has_state(exp.model):  # BatchNorm statistics (prep=conv).
    snapshot['state'] = model_state
  state.experiment_module = _Snapshot(snapshot)
  step_dir = series / '0'
  writer = tree_io.orbax_checkpointer(all_processes=False)
  try:
    tree_io.remove_interrupted_writes(series)
    tree_io.write_step(step_dir, state, writer)
  finally:
    writer.close()
  return {'step_dir': str(step_dir),
          'params': sum(int(np.size(p)) for p in jax.tree.leaves(params))}


def main(argv):
  del argv
  logs.configure()
  print(json.dumps(import_checkpoint(
      _CONFIG.value, _INPUT.value, _OUTPUT.value, fmt=_FORMAT.value,
      allow_unsafe_pickle=_ALLOW_UNSAFE_PICKLE.value)))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'input', 'output'])
  app.run(main)
