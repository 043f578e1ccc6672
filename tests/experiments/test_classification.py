"""The classification experiment through jaxline, on digits, 8 fake devices."""

import functools
import shutil

import jax
import numpy as np
import pytest

from experiments import classification
import experiments
from perceiver_jax.training import checkpointing
from perceiver_jax.training import jaxline_compat
from perceiver_jax.training import parallel
from tests import helpers
from tests import test_configs

jaxline = jaxline_compat.import_jaxline()


def _config(tmp_path, steps=4, arg='debug'):
  config = test_configs._load('digits.py', arg)  # pylint: disable=protected-access
  config.checkpoint_dir = str(tmp_path)
  config.training_steps = steps
  config.save_checkpoint_interval = 2
  config.log_tensors_interval = 1
  return config


def _train(config, extend=False):
  """Trains `config`; extend=True resumes a shorter run of it (a config
  change the checkpointer refuses unless allowed)."""
  checkpointer = checkpointing.make_checkpointer_factory(
      checkpoint_allow_config_change=extend)(config, 'train')
  jaxline.train.train(classification.ClassificationExperiment, config,
                      checkpointer, writer=None)
  return checkpointing.restore_checkpoint(config.checkpoint_dir)


def _copy_run(run, tmp_path):
  """A writable copy of a shared run's checkpoint directory."""
  shutil.copytree(run['dir'], tmp_path, dirs_exist_ok=True)
  return tmp_path


@pytest.fixture(scope='module')
def two_step_run(tmp_path_factory):
  """digits:debug trained 2 steps, shared read-only by this module's tests:
  {'dir': its checkpoint_dir, 'restored': restore_checkpoint of it}."""
  path = tmp_path_factory.mktemp('two_step_run')
  return {'dir': path, 'restored': _train(_config(path, steps=2))}


@pytest.fixture(scope='module')
def two_step_stateful_run(tmp_path_factory):
  """As `two_step_run`, for the model with BatchNorm state."""
  path = tmp_path_factory.mktemp('two_step_stateful_run')
  return {'dir': path, 'restored': _train(_stateful_config(path, steps=2))}


def test_pmapped_update_equals_single_device_update(tmp_path):
  """One update over 8 devices x 2 examples == 1 device x 16 examples."""
  exp_config = _config(tmp_path).experiment_kwargs.config
  with exp_config.unlocked():
    # Adam's first step divides g by |g| + eps: with the default eps=1e-6,
    # gradients of ~1e-9 (summed in another order) turn float noise into
    # visible differences. A larger eps keeps the comparison well posed.
    exp_config.optimizer.eps = 1e-2
  experiment = classification.ClassificationExperiment(
      'train', jax.random.PRNGKey(0), exp_config)
  batch = next(iter(experiment._data.load(  # pylint: disable=protected-access
      exp_config.data, 'train', is_training=True, batch_dims=(8, 2), seed=0)))
  experiment._initialize_params(batch)  # pylint: disable=protected-access
  params = parallel.unreplicate(experiment._params)  # pylint: disable=protected-access
  opt_state = parallel.unreplicate(experiment._opt_state)  # pylint: disable=protected-access
  results = []
  for devices in (jax.local_devices(), jax.local_devices()[:1]):
    n = len(devices)
    update = jax.pmap(experiment._update_fn, axis_name=parallel.AXIS_NAME,  # pylint: disable=protected-access
                      devices=devices)
    local = jax.tree.map(lambda x: x.reshape((n, 16 // n) + x.shape[2:]),
                         batch)
    rep = lambda t: jax.tree.map(lambda x: np.stack([x] * n), t)  # pylint: disable=cell-var-from-loop
    new_params, _, _, scalars = update(
        rep(params), {}, rep(opt_state), np.zeros([n], np.int32),
        rep(jax.random.PRNGKey(1)), local, np.zeros([n], np.int32))
    results.append((jax.tree.map(lambda x: np.asarray(x[0]), new_params),
                    float(scalars['loss'][0]), float(scalars['grad_norm'][0])))
  (p8, loss8, norm8), (p1, loss1, norm1) = results
  assert abs(loss8 - loss1) < 1e-6
  assert abs(norm8 - norm1) < 1e-6 * norm1
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6),
               p8, p1)
  # And the update really moved the parameters.
  assert not all(np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(p8), jax.tree.leaves(params)))


def test_resume_equals_uninterrupted_training(tmp_path, two_step_run):
  """2N steps == N steps, restart from the checkpoint, N more steps."""
  straight = _train(_config(tmp_path / 'straight', steps=4))
  resumed = _train(_config(_copy_run(two_step_run, tmp_path / 'resumed'),
                           steps=4), extend=True)
  assert int(straight['global_step']) == int(resumed['global_step']) == 4
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6),
               straight['experiment_module'], resumed['experiment_module'])


def test_evaluating_a_checkpoint_matches_training_eval(tmp_path):
  config = _config(tmp_path, steps=4)
  _train(config)
  from_checkpoint = experiments.evaluate_checkpoint(config,
                                                    str(tmp_path))
  assert from_checkpoint['step'] == 4
  assert from_checkpoint['num_examples'] == 300  # Every test image once.
  # The same metrics from a live experiment restored by the checkpointer.
  eval_config = _config(tmp_path, steps=4)
  eval_config.one_off_evaluate = True
  writer = helpers.ScalarRecorder()
  jaxline.train.evaluate(classification.ClassificationExperiment, eval_config,
                         checkpointing.make_checkpointer(eval_config, 'eval'),
                         writer, 'eval')
  (step, logged), = writer.scalars
  assert step == 4
  for key in ('top_1_acc', 'loss', 'num_examples'):
    assert abs(float(logged[key]) - from_checkpoint[key]) < 1e-6, key


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path,
                                                           two_step_run):
  config = _config(_copy_run(two_step_run, tmp_path), steps=6)
  with config.unlocked():
    config.experiment_kwargs.config.optimizer.base_lr = float('nan')
  with pytest.raises(classification.NonFiniteLossError, match='step 3'):
    _train(config, extend=True)
  assert int(checkpointing.restore_checkpoint(
      str(tmp_path))['global_step']) == 2


def test_batch_size_must_divide_devices(tmp_path):
  config = _config(tmp_path)
  config.experiment_kwargs.config.training.batch_size = 12
  with pytest.raises(ValueError, match='training.batch_size=12'):
    classification.ClassificationExperiment(
        'train', jax.random.PRNGKey(0), config.experiment_kwargs.config)


def _stateful_config(tmp_path, steps=2):
  """digits:debug with the released conv + BatchNorm preprocessing."""
  config = _config(tmp_path, steps=steps)
  with config.unlocked():
    config.experiment_kwargs.config.model.preprocessor.update(
        prep_type='conv', conv_channels=8, conv_norm='batch_norm',
        max_resolution=(2, 2))  # 8x8 digits -> a 2x2 grid.
  return config


def _fresh_experiment(exp_config):
  experiment = classification.ClassificationExperiment(
      'train', jax.random.PRNGKey(0), exp_config)
  batch = next(iter(experiment._data.load(  # pylint: disable=protected-access
      exp_config.data, 'train', is_training=True, batch_dims=(8, 2), seed=0)))
  experiment._initialize_params(batch)  # pylint: disable=protected-access
  return experiment


def test_stateful_model_trains_checkpoints_resumes_and_evaluates(
    tmp_path, two_step_stateful_run):
  config = _stateful_config(_copy_run(two_step_stateful_run, tmp_path),
                            steps=2)
  exp = classification.ClassificationExperiment(
      'train', jax.random.PRNGKey(0), config.experiment_kwargs.config)
  assert exp.forward is None and 'state' in exp.CHECKPOINT_ATTRS.values()
  # The class attribute (what stateless models save) is unchanged.
  assert classification.ClassificationExperiment.CHECKPOINT_ATTRS == {
      '_params': 'params', '_opt_state': 'opt_state'}
  state = two_step_stateful_run['restored']['experiment_module']['state']
  assert set(state) == {'preprocessor/batchnorm/~/mean_ema',
                        'preprocessor/batchnorm/~/var_ema'}
  assert int(state['preprocessor/batchnorm/~/mean_ema']['counter']) == 2
  assert np.all(state['preprocessor/batchnorm/~/var_ema']['average'] > 0)
  # Resuming carries the state on: 2 + 2 steps == 4 straight.
  straight = _train(_stateful_config(tmp_path / 'straight', steps=4))
  resumed = _train(_stateful_config(tmp_path, steps=4), extend=True)
  assert int(resumed['experiment_module']['state'][
      'preprocessor/batchnorm/~/mean_ema']['counter']) == 4
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6),
               straight['experiment_module'], resumed['experiment_module'])
  # Evaluation restores and uses the state.
  metrics = experiments.evaluate_checkpoint(config, str(tmp_path))
  assert metrics['step'] == 4 and metrics['num_examples'] == 300
  # A checkpoint without state cannot stand for a model with state.
  with pytest.raises(ValueError, match='checkpoint has none'):
    exp.restore_from_snapshot({k: v for k, v in resumed[
        'experiment_module'].items() if k != 'state'})


def test_pmapped_state_is_the_same_on_every_device(tmp_path):
  exp_config = _stateful_config(tmp_path).experiment_kwargs.config
  experiment = _fresh_experiment(exp_config)
  experiment.step(global_step=np.zeros([8], np.int32),
                  rng=jax.random.split(jax.random.PRNGKey(1), 8))
  for x in jax.tree.leaves(experiment._state):  # pylint: disable=protected-access
    x = np.asarray(x)
    np.testing.assert_allclose(x, np.broadcast_to(x[:1], x.shape), atol=1e-7)


@pytest.mark.parametrize('stateful', [False, True])
def test_init_checkpoint_gives_params_and_state_with_a_fresh_optimizer(
    request, tmp_path, stateful):
  make = _stateful_config if stateful else _config
  first = request.getfixturevalue(
      'two_step_stateful_run' if stateful else 'two_step_run')
  saved = first['restored']['experiment_module']
  config = make(tmp_path / 'second', steps=2)
  exp_config = config.experiment_kwargs.config
  exp_config.training.init_checkpoint = str(first['dir'])
  experiment = _fresh_experiment(exp_config)
  params = parallel.unreplicate(experiment._params)  # pylint: disable=protected-access
  jax.tree.map(np.testing.assert_array_equal, params, saved['params'])
  jax.tree.map(np.testing.assert_array_equal,
               parallel.unreplicate(experiment._state),  # pylint: disable=protected-access
               saved.get('state', {}))
  # The optimizer starts afresh (its state at init for these params), not
  # where the first run stopped.
  fresh = experiment._optimizer.init(params)  # pylint: disable=protected-access
  jax.tree.map(np.testing.assert_array_equal,
               parallel.unreplicate(experiment._opt_state), fresh)  # pylint: disable=protected-access
  saved_opt = jax.tree.leaves(saved['opt_state'])
  assert any(np.any(x != 0) for x in saved_opt)
  # And it trains from there, from step 0.
  resumed = _train(config)
  assert int(resumed['global_step']) == 2


def test_init_checkpoint_of_another_model_lists_the_differences(
    tmp_path, two_step_run):
  config = _config(tmp_path / 'second')
  exp_config = config.experiment_kwargs.config
  exp_config.training.init_checkpoint = str(two_step_run['dir'])
  with exp_config.unlocked():
    exp_config.model.encoder.latent_dim = 24
  with pytest.raises(ValueError, match='does not match') as info:
    _fresh_experiment(exp_config)
  assert 'params of another shape: encoder/latents: checkpoint [8, 16] vs ' \
      'model [8, 24]' in str(info.value)
  # A learned position encoding fixes the resolution: a clear hint.
  learned = _config(tmp_path / 'learned', steps=2)
  with learned.unlocked():
    learned.experiment_kwargs.config.model.preprocessor.update(
        position_encoding_type='learned', learned_pos_channels=4)
  _train(learned)
  experiment = classification.ClassificationExperiment(
      'train', jax.random.PRNGKey(0), learned.experiment_kwargs.config)
  params, state = experiment.forward_with_state.init(  # At 4x4, not 8x8.
      jax.random.PRNGKey(0), np.zeros((1, 4, 4, 1), np.float32),
      is_training=True)
  with pytest.raises(ValueError, match='resolution it was trained at') as info:
    experiment._read_init_checkpoint(str(tmp_path / 'learned'), params, state)  # pylint: disable=protected-access
  assert ('preprocessor/position_encoding/pos_embs: checkpoint [64, 4] vs '
          'model [16, 4]') in str(info.value)
