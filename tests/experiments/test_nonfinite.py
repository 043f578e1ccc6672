"""The finite-update guard (issue 27): a non-finite step is never applied,
never saved, and stops the run naming the step, or is skipped when
training.max_nonfinite_steps allows it."""

# pylint: disable=protected-access

import jax
import numpy as np
import pytest

from experiments import classification
from perceiver_jax.training import checkpointing
from perceiver_jax.training import jaxline_compat
from perceiver_jax.training import parallel
from tests import helpers
from tests.experiments import test_classification

jaxline = jaxline_compat.import_jaxline()


class _PoisonedExperiment(classification.ClassificationExperiment):
  """Feeds all-NaN images at the 0-based steps in `POISONED`."""

  POISONED = frozenset()

  def _build_input(self, is_training, start_step=0):
    batches = super()._build_input(is_training, start_step)
    if not is_training:
      return batches

    def poisoned():
      for step, batch in enumerate(batches, start_step):
        if step in self.POISONED:
          batch = dict(batch, inputs=np.full_like(batch['inputs'], np.nan))
        yield batch

    return poisoned()


def _all_finite(tree):
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.inexact))


def _train(config, experiment_class, writer=None):
  jaxline.train.train(experiment_class, config,
                      checkpointing.make_checkpointer(config, 'train'),
                      writer=writer)


def test_divergence_stops_naming_the_step_and_saves_no_nan(tmp_path):
  """The issue's repro: digits with base_lr=1e6, a checkpoint every step."""
  config = test_classification._config(tmp_path, steps=20)
  config.save_checkpoint_interval = 1
  config.experiment_kwargs.config.optimizer.base_lr = 1e6
  with pytest.raises(classification.NonFiniteUpdateError,
                     match=r'Stopping at step \d+/20: non-finite') as info:
    _train(config, classification.ClassificationExperiment)
  steps = checkpointing.list_steps(str(tmp_path))
  assert steps, 'the steps before the divergence were saved'
  assert f'the newest checkpoint, step {steps[-1]} in {tmp_path}' in str(
      info.value)
  # The failing step is the one after the newest checkpoint.
  assert f'step {steps[-1] + 1}/20' in str(info.value)
  for step in steps:
    restored = checkpointing.restore_checkpoint(tmp_path / 'latest' / str(step))
    assert _all_finite(restored['experiment_module']), step


def test_skipped_steps_leave_params_and_optimizer_unchanged(tmp_path):
  exp_config = test_classification._config(
      tmp_path, steps=8).experiment_kwargs.config
  experiment = test_classification._fresh_experiment(exp_config)
  good = next(iter(experiment._data.load(
      exp_config.data, 'train', is_training=True, batch_dims=(8, 2), seed=0)))
  bad = dict(good, inputs=np.array(good['inputs']))
  bad['inputs'][3, 1, 0, 0, 0] = np.inf  # One pixel on one device.
  rngs = jax.random.split(jax.random.PRNGKey(1), 8)

  def step(batch, global_step):
    experiment._train_input = iter([batch])
    before = parallel.unreplicate(
        (experiment._params, experiment._opt_state))
    scalars = experiment.step(
        global_step=np.full([8], global_step, np.int32), rng=rngs)
    after = parallel.unreplicate(
        (experiment._params, experiment._opt_state))
    return scalars, before, after

  def assert_unchanged(before, after):
    jax.tree.map(np.testing.assert_array_equal, after, before)
    # The same on every device.
    for x in jax.tree.leaves(experiment._params):
      x = np.asarray(x)
      np.testing.assert_array_equal(x, np.broadcast_to(x[:1], x.shape))

  # The default (max_nonfinite_steps=0): stop, nothing applied.
  initial = parallel.unreplicate(
      (experiment._params, experiment._opt_state))
  with pytest.raises(classification.NonFiniteUpdateError,
                     match=r'Stopping at step 1/8: non-finite'):
    step(bad, 0)
  assert_unchanged(initial, parallel.unreplicate(
      (experiment._params, experiment._opt_state)))
  exp_config.training.max_nonfinite_steps = 1
  for global_step in (1, 3):  # Applied; the count of bad steps restarts.
    scalars, before, after = step(good, global_step)
    assert scalars['nonfinite'] == 0
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(after[0]), jax.tree.leaves(before[0])))
    scalars, before, after = step(bad, global_step + 1)  # Skipped.
    assert scalars['nonfinite'] == 1
    assert_unchanged(before, after)
  with pytest.raises(classification.NonFiniteUpdateError,
                     match=r'step 6/8: .*\(2 in a row, more than '
                     r'training.max_nonfinite_steps=1\)'):
    step(bad, 5)


def test_max_nonfinite_steps_skips_and_counts_in_a_jaxline_run(tmp_path):
  class Poisoned(_PoisonedExperiment):
    POISONED = frozenset({2, 3})

  config = test_classification._config(tmp_path, steps=6)
  config.log_train_data_interval = 1
  config.experiment_kwargs.config.training.max_nonfinite_steps = 2
  writer = helpers.ScalarRecorder()
  _train(config, Poisoned, writer)
  nonfinite = {step: int(s['nonfinite']) for step, s in writer.scalars}
  # jaxline's step after the update: 0-based steps 2 and 3 are 3 and 4.
  assert nonfinite == {1: 0, 2: 0, 3: 1, 4: 1, 5: 0, 6: 0}
  for step in checkpointing.list_steps(str(tmp_path)):
    restored = checkpointing.restore_checkpoint(tmp_path / 'latest' / str(step))
    assert _all_finite(restored['experiment_module']), step
  assert int(restored['global_step']) == 6
