"""Pytrees on disk: nested-dict conversion, one step's write and read."""

import os

import jax
import ml_collections
import numpy as np
import optax
import pytest

from perceiver_jax.training import tree_io

_OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1))


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


class _Snapshot:
  """Stands in for a jaxline experiment: only snapshot_state is used."""

  def __init__(self, snapshot):
    self._snapshot = snapshot

  def snapshot_state(self):
    return self._snapshot


def test_to_nested_dict_names_containers_and_rejects_bare_leaves():
  nested = tree_io.to_nested_dict(
      {'a': (np.zeros(2), None, ()), 'b': [np.ones(1)]})
  assert set(nested) == {'a', 'b'}
  assert set(nested['a']) == {'0'}  # Leafless containers disappear.
  np.testing.assert_array_equal(nested['b']['0'], np.ones(1))
  _assert_trees_equal(tree_io.to_nested_dict(nested), nested)  # Idempotent.
  with pytest.raises(ValueError, match='bare leaf'):
    tree_io.to_nested_dict(np.zeros(3))


def test_restore_structure_names_mismatches():
  template = _OPTIMIZER.init({'w': np.zeros(3, np.float32)})
  good = tree_io.to_nested_dict(template)
  _assert_trees_equal(tree_io.restore_structure(template, good),
                      jax.device_get(template))
  bad = tree_io.to_nested_dict(
      _OPTIMIZER.init({'w': np.zeros(4, np.float32), 'b': np.zeros(1)}))
  with pytest.raises(ValueError, match=r'1/0/mu/w: checkpoint has float32\[4\]'
                     r'(.|\n)*1/0/mu/b: in the checkpoint but not'):
    tree_io.restore_structure(template, bad)
  with pytest.raises(ValueError, match='1/0/count: missing'):
    tree_io.restore_structure(template, {'1': {}})


def test_write_step_then_read_step(tmp_path):
  series_dir = tree_io.as_path(tmp_path)
  state = ml_collections.ConfigDict()
  state.global_step = 3
  state.experiment_module = _Snapshot(
      {'params': {'w': np.arange(3.0)}, 'opt_state': None})
  state.train_step_rng = jax.random.key(1)
  state.best_eval_metric_value = 0.25
  # A plain Checkpointer's step (scripts/import_checkpoint.py) is a step of
  # the series for its manager.
  writer = tree_io.orbax_checkpointer(all_processes=False)
  manager = tree_io.series_manager(series_dir, all_processes=False)
  try:
    tree_io.write_step(series_dir / '3', state, writer)
    manager.reload()
    assert manager.all_steps() == [3]
    read = tree_io.read_step(manager, 3)
    state.bad = np.zeros(2)  # Only scalars and strings besides the arrays.
    with pytest.raises(ValueError, match="state entry 'bad'"):
      tree_io.write_step(series_dir / '4', state, writer)
  finally:
    writer.close()
    manager.close()
  assert tree_io.complete_steps(series_dir) == [3]
  assert read['global_step'] == 3 and read['best_eval_metric_value'] == 0.25
  assert read['path'] == str(series_dir / '3')
  assert read['experiment_module']['opt_state'] is None
  # A CRC32 of every array, committed with it (checked by read_step).
  assert set(read['_meta']['checksums']) == {'experiment_module/params/w',
                                             'train_step_rng'}
  assert read['_meta']['checksums']['experiment_module/params/w'].endswith(
      ' float64[3]')
  np.testing.assert_array_equal(read['experiment_module']['params']['w'],
                                np.arange(3.0))
  rng = tree_io.wrap_rng(read['train_step_rng'], read['_meta'])
  np.testing.assert_array_equal(jax.random.key_data(rng),
                                jax.random.key_data(jax.random.key(1)))


def test_interrupted_writes_are_incomplete_and_removed(tmp_path):
  """Uncommitted steps are not listed, neither by us nor by the manager."""
  series_dir = tree_io.as_path(tmp_path)
  os.makedirs(tmp_path / '1.orbax-checkpoint-tmp-123' / 'state')
  os.makedirs(tmp_path / '5' / 'state')
  os.makedirs(tmp_path / '7')
  (tmp_path / '7' / 'commit_success.txt').write_text('')
  assert tree_io.is_step_dir(series_dir / '1.orbax-checkpoint-tmp-123')
  assert not tree_io.is_complete_step(series_dir / '5')
  assert tree_io.complete_steps(series_dir) == [7]
  manager = tree_io.series_manager(series_dir, all_processes=False)
  try:
    assert manager.all_steps() == [7]
  finally:
    manager.close()
  tree_io.remove_interrupted_writes(series_dir)
  assert os.listdir(tmp_path) == ['7']
