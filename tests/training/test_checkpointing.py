"""Disk checkpoints: round trips, pruning, interrupted writes, resuming."""

import os
import subprocess
import sys

from absl import flags
from etils import epath
import jax
import jax.numpy as jnp
from jaxline import base_config
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from perceiver_jax.training import checkpoint_integrity as integrity
from perceiver_jax.training import checkpointing
from perceiver_jax.training import config_record
from perceiver_jax.training import jaxline_compat
from perceiver_jax.training import tree_io
from tests import helpers

jaxline = jaxline_compat.import_jaxline()


@pytest.fixture(autouse=True, scope='module')
def _absl_flags():
  # jaxline.train reads absl flags (--jaxline_disable_pmap_jit).
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _config(tmp_path, **overrides) -> ml_collections.ConfigDict:
  config = base_config.get_base_config()
  config.checkpoint_dir = str(tmp_path)
  config.interval_type = 'steps'
  config.log_tensors_interval = 1000
  config.log_async = False
  config.update(overrides)
  return config


_OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1))


class _Experiment(jaxline.experiment.AbstractExperiment):
  """Params {'w': [4]} (+ optax state) updated by a pmapped noisy step."""

  CHECKPOINT_ATTRS = {'params': 'params', 'opt_state': 'opt_state'}
  instances = []

  def __init__(self, mode, init_rng, config=None):
    super().__init__(mode=mode, init_rng=init_rng)
    del config
    self.params = None
    self.opt_state = None
    self.steps_seen = []
    self.update = jax.pmap(self._update_fn, axis_name='i')
    _Experiment.instances.append(self)

  def init_params(self):
    params = {'linear': {'w': jnp.arange(4.0)}}
    self.params = jaxline.utils.bcast_local_devices(params)
    self.opt_state = jaxline.utils.bcast_local_devices(
        _OPTIMIZER.init(params))

  @staticmethod
  def _update_fn(params, opt_state, rng):
    noise = jax.random.normal(rng, [4])  # Differs per device and step.
    grads = jax.lax.pmean({'linear': {'w': params['linear']['w'] - noise}},
                          'i')
    updates, opt_state = _OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def step(self, *, global_step, rng, writer):
    del writer
    self.steps_seen.append(int(global_step[0]))
    if self.params is None:  # Lazy initialisation, as in the real ones.
      self.init_params()
    self.params, self.opt_state = self.update(self.params,
                                               self.opt_state, rng)
    return {'w0': self.params['linear']['w'][0, 0]}

  def evaluate(self, *, global_step, rng, writer):
    del global_step, rng, writer
    return {'score': -float(jnp.sum(self.params['linear']['w'][0] ** 2))}

  def restore_from_snapshot(self, snapshot_state):
    params = snapshot_state['params']
    opt_state = tree_io.restore_structure(_OPTIMIZER.init(params),
                                          snapshot_state['opt_state'])
    self.params = jaxline.utils.bcast_local_devices(params)
    self.opt_state = jaxline.utils.bcast_local_devices(opt_state)


def _save(checkpointer, step, experiment=None, series='latest', **extra):
  state = checkpointer.get_experiment_state(series)
  if experiment is None:
    experiment = _Experiment('train', jax.random.PRNGKey(0))
    experiment.init_params()
  state.global_step = step
  state.experiment_module = experiment
  state.train_step_rng = jaxline.utils.bcast_local_devices(
      jax.random.PRNGKey(step))
  for key, value in extra.items():
    state[key] = value
  checkpointer.save(series)
  return experiment


def _fresh_state(checkpointer, series='latest'):
  state = checkpointer.get_experiment_state(series)
  state.global_step = 0
  state.experiment_module = _Experiment('train', jax.random.PRNGKey(1))
  state.train_step_rng = None
  return state


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_round_trip_in_a_fresh_checkpointer(tmp_path):
  config = _config(tmp_path)
  saved = _Experiment('train', jax.random.PRNGKey(0))
  saved.init_params()
  saved.params, saved.opt_state = saved.update(
      saved.params, saved.opt_state,
      jaxline.utils.bcast_local_devices(jax.random.PRNGKey(5)))
  rng = jax.random.split(jax.random.PRNGKey(9), 8)  # Distinct per device.
  writer = checkpointing.make_checkpointer(config, 'train')
  state = writer.get_experiment_state('latest')
  state.global_step = 7
  state.experiment_module = saved
  state.train_step_rng = jaxline_compat.device_put_sharded(
      list(rng), jax.local_devices())
  writer.save('latest')

  restorer = checkpointing.make_checkpointer(config, 'train')
  assert restorer.can_be_restored('latest')
  new = _fresh_state(restorer)
  assert new.experiment_module.params is None
  restorer.restore('latest')
  assert new.global_step == 7
  np.testing.assert_array_equal(np.asarray(new.train_step_rng), rng)
  # Back on the 8 local devices, one key each, usable by pmap.
  assert len(new.train_step_rng.sharding.device_set) == 8
  jax.pmap(lambda k: jax.random.normal(k, []))(new.train_step_rng)
  restored = new.experiment_module
  _assert_trees_equal(jax.device_get(restored.params),
                      jax.device_get(saved.params))
  # optax's NamedTuples come back as NamedTuples.
  _assert_trees_equal(jax.device_get(restored.opt_state),
                      jax.device_get(saved.opt_state))
  assert isinstance(restored.opt_state[1][0], optax.ScaleByAdamState)

  outside = checkpointing.restore_checkpoint(tmp_path)
  assert outside['global_step'] == 7
  assert outside['path'] == str(tmp_path / 'latest' / '7')
  np.testing.assert_array_equal(
      outside['experiment_module']['params']['linear']['w'],
      np.asarray(saved.params['linear']['w'][0]))
  # Containers of the optax state became dicts keyed by index / field.
  assert set(outside['experiment_module']['opt_state']['1']['0']) == {
      'count', 'mu', 'nu'}


def test_relative_and_home_directories(tmp_path, monkeypatch):
  """A relative checkpoint_dir (as in the README's main command) or one
  under ~ is used as the absolute path it names: orbax rejects relative
  ones."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  for directory, absolute in (('runs/digits', tmp_path / 'runs' / 'digits'),
                              ('~/ckpt', tmp_path / 'home' / 'ckpt')):
    writer = checkpointing.make_checkpointer(
        _config(tmp_path, checkpoint_dir=directory), 'train')
    assert writer.directory == absolute
    saved = _save(writer, 3)
    assert checkpointing.list_steps(directory) == [3]
    outside = checkpointing.restore_checkpoint(directory)
    assert outside['path'] == str(absolute / 'latest' / '3')
    np.testing.assert_array_equal(
        outside['experiment_module']['params']['linear']['w'],
        np.asarray(saved.params['linear']['w'][0]))  # One device's copy.


def test_typed_key_rng_and_none_entries_round_trip(tmp_path):
  config = _config(tmp_path)
  experiment = _Experiment('train', jax.random.PRNGKey(0))  # params: None.
  writer = checkpointing.make_checkpointer(config, 'train')
  state = writer.get_experiment_state('latest')
  state.global_step = 0
  state.experiment_module = experiment
  keys = jax.random.split(jax.random.key(3), 8)
  state.train_step_rng = keys
  writer.save('latest')
  restored = checkpointing.restore_checkpoint(tmp_path)
  assert restored['experiment_module'] == {'params': None, 'opt_state': None}
  np.testing.assert_array_equal(jax.random.key_data(restored['train_step_rng']),
                                jax.random.key_data(keys))
  reader = checkpointing.make_checkpointer(config, 'train')
  new = _fresh_state(reader)
  new.experiment_module.restore_from_snapshot = lambda s: None
  reader.restore('latest')
  assert new.train_step_rng.shape == (8,)
  assert len(new.train_step_rng.sharding.device_set) == 8


def test_keeps_the_last_k_and_removes_interrupted_writes(tmp_path):
  config = _config(tmp_path, max_checkpoints_to_keep=2)
  # Left by a write killed half-way: orbax's temporary directory, and a
  # step without its commit marker (GCS writes in place).
  os.makedirs(tmp_path / 'latest' / '1.orbax-checkpoint-tmp-123' / 'state')
  os.makedirs(tmp_path / 'latest' / '5' / 'state')
  checkpointer = checkpointing.make_checkpointer(config, 'train')
  experiment = None
  for step in (1, 2, 3, 4):
    experiment = _save(checkpointer, step, experiment)
  assert checkpointing.list_steps(tmp_path) == [3, 4]
  assert checkpointing.latest_step(tmp_path / 'latest') == 4
  # The manager deleted orbax's tmp dir; the uncommitted step is ignored...
  assert sorted(os.listdir(tmp_path / 'latest')) == ['3', '4', '5']
  # ...until its step is saved over it.
  _save(checkpointer, 5, experiment)
  assert checkpointing.list_steps(tmp_path) == [4, 5]
  assert sorted(os.listdir(tmp_path / 'latest')) == ['4', '5']
  # Saving the same step twice (jaxline's final save) is a no-op.
  _save(checkpointer, 5, experiment)
  assert checkpointing.list_steps(tmp_path) == [4, 5]


def test_best_series_is_kept_separately_by_metric(tmp_path):
  config = _config(tmp_path, max_checkpoints_to_keep=1,
                   best_model_eval_metric='score')
  factory = checkpointing.make_checkpointer_factory(best_checkpoints_to_keep=2)
  checkpointer = factory(config, 'eval')
  for step, score in ((2, 0.5), (4, 0.7), (6, 0.6)):
    _save(checkpointer, step)
    _save(checkpointer, step, series='best', best_eval_metric_value=score,
          best_model_eval_metric='score')
  assert checkpointing.list_steps(tmp_path) == [6]
  assert checkpointing.list_steps(tmp_path / 'best') == [4, 6]
  assert checkpointer.restore_path('best') == str(tmp_path / 'best' / '4')
  reader = checkpointing.make_checkpointer(config, 'eval')
  best = _fresh_state(reader, 'best')
  best.best_eval_metric_value = float('-inf')
  reader.restore('best')
  assert best.global_step == 4 and best.best_eval_metric_value == 0.7
  assert checkpointing.restore_checkpoint(tmp_path / 'best' / '6')[
      'best_eval_metric_value'] == 0.6


def test_best_k_ranks_a_nan_metric_worst(tmp_path):
  config = _config(tmp_path, best_model_eval_metric='score')
  checkpointer = checkpointing.make_checkpointer_factory(
      best_checkpoints_to_keep=2)(config, 'eval')
  for step, score in ((2, 0.5), (4, 0.7), (6, 0.6), (8, float('nan'))):
    _save(checkpointer, step, series='best', best_eval_metric_value=score)
  # The manager kept the two best; the NaN one went at once.
  assert checkpointing.list_steps(tmp_path / 'best') == [4, 6]
  assert checkpointer.restore_path('best') == str(tmp_path / 'best' / '4')


def test_async_saves_finish_before_listing_restoring_and_closing(tmp_path):
  config = _config(tmp_path, max_checkpoints_to_keep=2, checkpoint_async=True)
  writer = checkpointing.make_checkpointer(config, 'train')
  experiment = None
  for step in (1, 2, 3):
    experiment = _save(writer, step, experiment)
  writer.wait_for_checkpointing_to_finish()
  assert checkpointing.list_steps(tmp_path) == [2, 3]
  assert not [n for n in os.listdir(tmp_path / 'latest') if 'tmp' in n]
  _save(writer, 4, experiment)
  # restore_path waits for step 4 instead of answering step 3.
  assert writer.restore_path('latest') == str(tmp_path / 'latest' / '4')
  writer.close()
  restorer = checkpointing.make_checkpointer(config, 'train')
  state = _fresh_state(restorer)
  restorer.restore('latest')
  assert state.global_step == 4
  _assert_trees_equal(jax.device_get(state.experiment_module.params),
                      jax.device_get(experiment.params))


def _write_old_layout_step(series_dir, step, params, config, **extra):
  """A step as perceiver_jax wrote it before the CheckpointManager: a plain
  orbax Checkpointer, items state (arrays) and meta (JSON), no metrics."""
  tree = {'experiment_module': {'params': params, 'opt_state': {}}}
  meta = {'format': 1, 'global_step': step, 'none_keys': [],
          'extra': extra, 'config': config_record.resolved(config),
          'checksums': integrity.checksums(tree)}
  handler = ocp.CompositeCheckpointHandler(
      state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler())
  with ocp.Checkpointer(handler) as writer:
    writer.save(epath.Path(series_dir) / str(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))


def test_steps_written_before_the_manager_restore_and_are_managed(tmp_path):
  config = _config(tmp_path, max_checkpoints_to_keep=2)
  old = {'linear': {'w': np.arange(4.0, dtype=np.float32) + 10}}
  for step in (2, 4):
    _write_old_layout_step(tmp_path / 'latest', step, old, config)
  _write_old_layout_step(tmp_path / 'best', 3, old, config,
                         best_eval_metric_value=0.25)
  checkpointer = checkpointing.make_checkpointer(config, 'train')
  state = _fresh_state(checkpointer)
  snapshots = []
  state.experiment_module.restore_from_snapshot = snapshots.append
  checkpointer.restore('latest')
  assert state.global_step == 4
  np.testing.assert_array_equal(snapshots[0]['params']['linear']['w'],
                                old['linear']['w'])
  # The manager counts the old steps in its retention: step 2 makes room.
  _save(checkpointer, 6)
  assert checkpointing.list_steps(tmp_path) == [4, 6]
  best = _fresh_state(checkpointer, 'best')
  best.best_eval_metric_value = float('-inf')
  best.experiment_module.restore_from_snapshot = lambda s: None
  checkpointer.restore('best')
  assert best.global_step == 3 and best.best_eval_metric_value == 0.25


def _corrupt(step_dir):
  """Truncates every array data file of a step (a damaged disk)."""
  count = 0
  for root, _, files in os.walk(step_dir / 'state'):
    for name in files:
      path = os.path.join(root, name)
      if '/d' in root and os.path.getsize(path) > 1:
        with open(path, 'r+b') as f:
          f.truncate(os.path.getsize(path) // 2)
        count += 1
  assert count


def test_interrupted_and_corrupt_checkpoints_are_never_loaded(tmp_path):
  config = _config(tmp_path)
  checkpointer = checkpointing.make_checkpointer(config, 'train')
  for step in (2, 4):
    _save(checkpointer, step)
  latest = tmp_path / 'latest'
  # A write killed half-way (orbax's temporary dir) and a step directory
  # that never got its commit marker are both ignored.
  os.makedirs(latest / '6.orbax-checkpoint-tmp-99' / 'state')
  os.makedirs(latest / '8' / 'state')
  assert checkpointing.list_steps(tmp_path) == [2, 4]
  assert checkpointer.restore_path('latest') == str(latest / '4')
  with pytest.raises(ValueError, match='incomplete'):
    checkpointing.restore_checkpoint(latest / '8')
  with pytest.raises(ValueError, match='incomplete'):
    checkpointing.restore_checkpoint(latest / '6.orbax-checkpoint-tmp-99')

  # A complete step whose files were damaged afterwards: a clear error
  # naming the file when asked for by name; the previous step otherwise...
  _corrupt(latest / '4')
  with pytest.raises(RuntimeError,
                     match=r'latest/4 is unreadable.*latest/4/state/d/.*'
                     r'latest/2'):
    checkpointing.restore_checkpoint(latest / '4')
  assert checkpointing.restore_checkpoint(tmp_path)['global_step'] == 2
  # ...and jaxline's restore falls back to the previous step.
  restorer = checkpointing.make_checkpointer(config, 'train')
  state = _fresh_state(restorer)
  restorer.restore('latest')
  assert state.global_step == 2
  # The damaged step is moved aside: not listed, not kept over good ones.
  assert checkpointing.list_steps(tmp_path) == [2]
  assert any(name.startswith('4.corrupt') for name in os.listdir(latest))
  # With every step damaged, restore refuses instead of loading garbage.
  _corrupt(latest / '2')
  with pytest.raises(RuntimeError, match='could be read'):
    restorer.restore('latest')
  assert not restorer.can_be_restored('latest')


def test_missing_directory_errors(tmp_path):
  missing = tmp_path / 'nope'
  with pytest.raises(FileNotFoundError, match='nope'):
    checkpointing.restore_checkpoint(missing)
  with pytest.raises(FileNotFoundError, match='nope'):
    checkpointing.list_steps(missing)
  with pytest.raises(FileNotFoundError, match='No complete checkpoint'):
    checkpointing.restore_checkpoint(tmp_path)
  checkpointer = checkpointing.make_checkpointer(_config(missing), 'train')
  assert checkpointer.restore_path('latest') is None
  assert not checkpointer.can_be_restored('latest')
  with pytest.raises(ValueError, match='checkpoint_dir'):
    checkpointing.make_checkpointer(_config(''), 'train')
  with pytest.raises(ValueError, match='checkpoint_dir is None'):
    checkpointing.make_checkpointer(base_config.get_base_config(), 'train')
  with pytest.raises(ValueError, match='got 0'):
    checkpointing.make_checkpointer(
        _config(tmp_path, max_checkpoints_to_keep=0), 'train')
  with pytest.raises(ValueError, match='series'):
    checkpointer.restore_path('newest')


def test_eval_checkpointer_sees_checkpoints_written_later(tmp_path):
  config = _config(tmp_path)
  evaluator = checkpointing.make_checkpointer(config, 'eval')
  assert evaluator.restore_path('latest') is None
  trainer = checkpointing.make_checkpointer(config, 'train')
  _save(trainer, 2)
  first = evaluator.restore_path('latest')
  _save(trainer, 4)
  assert evaluator.restore_path('latest') not in (None, first)
  state = _fresh_state(evaluator)
  evaluator.restore('latest')
  assert state.global_step == 4


def _train(tmp_path, steps, **overrides):
  config = _config(tmp_path, training_steps=steps, save_checkpoint_interval=2,
                   max_checkpoints_to_keep=2, **overrides)
  _Experiment.instances.clear()
  jaxline.train.train(_Experiment, config,
                      checkpointing.make_checkpointer(config, 'train'),
                      writer=None)
  (experiment,) = _Experiment.instances
  return experiment, checkpointing.restore_checkpoint(tmp_path)


def test_jaxline_training_resumes_from_disk(tmp_path):
  straight, straight_ckpt = _train(tmp_path / 'straight', 6)
  first, _ = _train(tmp_path / 'resumed', 3)
  # Extending a run changes training_steps, which schedules depend on.
  second, resumed_ckpt = _train(tmp_path / 'resumed', 6,
                                checkpoint_allow_config_change=True)
  assert straight.steps_seen == [0, 1, 2, 3, 4, 5]
  assert first.steps_seen == [0, 1, 2]
  assert second.steps_seen == [3, 4, 5]  # Continued from the saved step.
  assert straight_ckpt['global_step'] == resumed_ckpt['global_step'] == 6
  # Same params, optimizer state and rng as without the interruption.
  _assert_trees_equal(straight_ckpt['experiment_module'],
                      resumed_ckpt['experiment_module'])
  np.testing.assert_array_equal(straight_ckpt['train_step_rng'],
                                resumed_ckpt['train_step_rng'])
  assert checkpointing.list_steps(tmp_path / 'resumed') == [4, 6]

  # An evaluator restores the newest step and saves it as the best.
  config = _config(tmp_path / 'resumed', training_steps=6,
                   one_off_evaluate=True, best_model_eval_metric='score')
  jaxline.train.evaluate(_Experiment, config,
                         checkpointing.make_checkpointer(config, 'eval'),
                         writer=None, jaxline_mode='eval')
  best = checkpointing.restore_checkpoint(tmp_path / 'resumed' / 'best')
  w = resumed_ckpt['experiment_module']['params']['linear']['w']
  assert best['global_step'] == 6
  np.testing.assert_allclose(best['best_eval_metric_value'],
                             -np.sum(w ** 2), rtol=1e-6)


@pytest.mark.slow
def test_two_processes_one_writer_both_resume(tmp_path):
  """jax.distributed on 127.0.0.1: process 0 writes, both restore."""
  env = helpers.multiprocess_environ(
      PYTHONPATH=helpers.ROOT, JAX_PLATFORMS='cpu',
      XLA_FLAGS='--xla_force_host_platform_device_count=2')
  for steps in (3, 5):
    port = helpers.free_port()
    procs = [subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), str(port), str(i),
         str(tmp_path), str(steps)], env=env, cwd=helpers.ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
      assert p.returncode == 0, out[-3000:]
  results = [np.load(tmp_path / f'process_{i}.npz') for i in range(2)]
  for result in results:
    assert list(result['steps_seen']) == [3, 4]  # Both resumed at step 3.
  np.testing.assert_array_equal(results[0]['w'], results[1]['w'])
  assert checkpointing.latest_step(tmp_path / 'ckpt') == 5
  # Only process 0 wrote: one copy of each step (and of the config record),
  # no stray files.
  assert sorted(os.listdir(tmp_path / 'ckpt')) == ['config.json', 'latest']


def _worker(port, process_id, out_dir, steps, all_hosts='0'):
  """One process of test_two_processes_one_writer_both_resume."""
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'127.0.0.1:{port}', 2, int(process_id))
  flags.FLAGS.mark_as_parsed()
  config = _config(os.path.join(out_dir, 'ckpt'), training_steps=int(steps),
                   save_checkpoint_interval=2,
                   train_checkpoint_all_hosts=all_hosts == '1',
                   checkpoint_allow_config_change=True)  # 3, then 5 steps.
  jaxline.train.train(_Experiment, config,
                      checkpointing.make_checkpointer(config, 'train'),
                      writer=None)
  (experiment,) = _Experiment.instances
  np.savez(os.path.join(out_dir, f'process_{process_id}.npz'),
           steps_seen=np.asarray(experiment.steps_seen),
           w=np.asarray(experiment.params['linear']['w'][0]))


if __name__ == '__main__':
  _worker(*sys.argv[1:])
