"""ModelNet40 end to end: jaxline training and evaluation on the fixture.

The committed fixture (tests/testdata/modelnet40: 5 solids, 100 train / 40
test clouds) is read as PointNet-style h5 files and, after
scripts/prepare_modelnet40.py, as the 'off_cache' format. Runs on the 8 fake
CPU devices of conftest.py.
"""

import os

import numpy as np
import pytest

from experiments import classification
import experiments
from perceiver_jax import models
from perceiver_jax.data import modelnet40
from perceiver_jax.training import checkpointing
from perceiver_jax.training import jaxline_compat
from scripts import prepare_modelnet40
from tests import helpers
from tests import test_configs

jaxline = jaxline_compat.import_jaxline()

_FIXTURE = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'testdata', 'modelnet40')
_H5_DIR = os.path.join(_FIXTURE, 'modelnet40_ply_hdf5_2048')
_OFF_DIR = os.path.join(_FIXTURE, 'ModelNet40')
_NUM_TEST = 40
_FIXTURE_CLASSES = 5


def _load(arg):
  # pylint: disable-next=protected-access
  return test_configs._load('modelnet40.py', arg)


def _config(checkpoint_dir, *, data_format='h5', data_dir=_H5_DIR, steps=3,
            arg='debug'):
  config = _load(arg)
  config.checkpoint_dir = str(checkpoint_dir)
  config.training_steps = steps
  config.save_checkpoint_interval = steps
  config.log_tensors_interval = 1
  data = config.experiment_kwargs.config.data
  data.format = data_format
  data.data_dir = data_dir
  return config


def _train(config):
  checkpointer = checkpointing.make_checkpointer(config, 'train')
  jaxline.train.train(classification.ClassificationExperiment, config,
                      checkpointer, writer=None)


@pytest.fixture(scope='module')
def off_cache(tmp_path_factory):
  """The OFF fixture sampled into the loader's 'off_cache' format."""
  output_dir = str(tmp_path_factory.mktemp('modelnet40_cache'))
  summary = prepare_modelnet40.prepare(off_dir=_OFF_DIR,
                                       output_dir=output_dir, num_points=256)
  assert summary['classes'] == _FIXTURE_CLASSES
  assert summary['splits']['test']['written'] == _NUM_TEST
  return output_dir


def _per_class(results):
  """{label: accuracy} from the class_acc/NNN entries of eval results."""
  return {int(k.split('/')[1]): v for k, v in results.items()
          if k.startswith('class_acc/')}


def _check_consistent(results, labels):
  """Overall, mean-class and per-class accuracies agree with each other."""
  per_class = _per_class(results)
  # A 40-way head, but only the classes with test examples are reported.
  assert sorted(per_class) == sorted(set(labels.tolist()))
  assert all(0 <= acc <= 1 for acc in per_class.values())
  assert results['mean_class_acc'] == pytest.approx(
      np.mean(list(per_class.values())), abs=1e-12)
  support = np.bincount(labels)
  assert results['top_1_acc'] == pytest.approx(
      sum(support[k] * acc for k, acc in per_class.items()) / len(labels),
      abs=1e-12)
  assert results['num_examples'] == len(labels)


def _direct_eval(config, checkpoint_dir):
  """Metrics of one un-pmapped forward pass over the whole test split.

  Returns:
    (labels [N], {'loss', 'top_1_acc', 'class_acc': {label: acc}}, and the
    number of examples whose top-2 logits are within float noise, which the
    pmapped evaluation may rank differently).
  """
  exp = config.experiment_kwargs.config
  points, labels = modelnet40.read_split(exp.data, 'test')
  inputs = modelnet40.preprocess_eval(points, exp.data.num_points)
  params = checkpointing.restore_checkpoint(
      checkpoint_dir)['experiment_module']['params']
  logits = np.asarray(models.make_forward(exp.model).apply(
      params, None, inputs, is_training=False), np.float64)  # [N, K]
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  top2 = np.sort(logits, axis=-1)[:, -2:]
  near_ties = int(np.sum(top2[:, 1] - top2[:, 0] < 1e-4))
  correct = np.argmax(logits, -1) == labels
  direct = {
      'loss': float(-np.mean(log_probs[np.arange(len(labels)), labels])),
      'top_1_acc': float(correct.mean()),
      'class_acc': {int(k): float(correct[labels == k].mean())
                    for k in np.unique(labels)},
  }
  return labels, direct, near_ties


@pytest.fixture(scope='module')
def h5_run(tmp_path_factory):
  """A checkpoint dir after 3 debug-preset steps on the h5 fixture."""
  checkpoint_dir = tmp_path_factory.mktemp('h5_run')
  _train(_config(checkpoint_dir))
  return checkpoint_dir


@pytest.mark.parametrize('data_format, num_classes', [
    ('h5', 40),  # The debug preset's head: classes 5..39 have no example.
    ('off_cache', 5),  # Every prediction is a fixture class.
])
def test_train_then_evaluate_reports_consistent_class_metrics(
    request, tmp_path, data_format, num_classes):
  if data_format == 'h5':
    checkpoint_dir, data_dir = request.getfixturevalue('h5_run'), _H5_DIR
    config = _config(checkpoint_dir)
  else:
    checkpoint_dir, data_dir = tmp_path, request.getfixturevalue('off_cache')
    config = _config(checkpoint_dir, data_format=data_format,
                     data_dir=data_dir)
    config.experiment_kwargs.config.data.num_classes = num_classes
    _train(config)
  assert checkpointing.latest_step(str(checkpoint_dir)) == 3

  results = experiments.evaluate_checkpoint(config, str(checkpoint_dir))
  assert results['step'] == 3
  assert ('top_5_acc' in results) == (num_classes > 5)
  labels, direct, near_ties = _direct_eval(config, str(checkpoint_dir))
  assert len(labels) == _NUM_TEST
  _check_consistent(results, labels)
  # Every test cloud counted exactly once: the padded 8-device evaluation
  # (batches of 16: 40 = 16 + 16 + 8 real + 8 padding) equals one forward
  # pass over the 40 clouds. The mean loss differs for every example, so a
  # cloud counted twice, a missing one or a padding row would show.
  assert results['loss'] == pytest.approx(direct['loss'], rel=1e-5)
  assert abs(results['top_1_acc'] - direct['top_1_acc']) <= (
      near_ties / _NUM_TEST)
  if near_ties == 0:
    assert _per_class(results) == pytest.approx(direct['class_acc'],
                                                 abs=1e-12)


def test_eval_batch_size_does_not_change_the_metrics(h5_run):
  """Padding differs (40 = 5 x 8; 40 = 24 + 16 real + 8 padding) but every
  example is counted once either way."""
  results = []
  for batch_size in (8, 24):
    config = _config(h5_run)
    config.experiment_kwargs.config.evaluation.batch_size = batch_size
    results.append(experiments.evaluate_checkpoint(config, str(h5_run)))
  small, large = results
  assert small['num_examples'] == large['num_examples'] == _NUM_TEST
  assert set(small) == set(large)
  for key in small:
    if key not in ('step', 'split'):
      assert small[key] == pytest.approx(large[key], abs=1e-5), key


def test_jaxline_eval_writes_class_metrics(h5_run):
  """jaxline's own evaluate() loop logs the per-class scalars."""
  config = _config(h5_run)
  config.one_off_evaluate = True
  writer = helpers.ScalarRecorder()
  jaxline.train.evaluate(classification.ClassificationExperiment, config,
                         checkpointing.make_checkpointer(config, 'eval'),
                         writer, 'eval')
  (step, logged), = writer.scalars
  assert step == 3
  logged = {k: float(v) for k, v in logged.items()}
  labels = modelnet40.read_split(config.experiment_kwargs.config.data,
                                 'test')[1]
  _check_consistent(logged, labels)


@pytest.mark.slow
def test_fixture_preset_learns_above_chance(tmp_path):
  """A fifth of the fixture preset's run (~30 s) beats chance (1/5) by far."""
  config = _config(tmp_path, arg='fixture', steps=60)
  _train(config)
  results = experiments.evaluate_checkpoint(config, str(tmp_path))
  labels = modelnet40.read_split(config.experiment_kwargs.config.data,
                                 'test')[1]
  _check_consistent(results, labels)
  assert results['top_1_acc'] >= 0.6, results
  assert results['mean_class_acc'] >= 0.6, results


# The config.


def test_data_section_matches_the_loader_defaults():
  expected = modelnet40.default_config().to_dict()
  assert _load(None).experiment_kwargs.config.data.to_dict() == expected
  fixture_fields = {'data_dir', 'num_points', 'input_shape',
                    'num_train_examples', 'num_classes'}
  for arg in ('debug', 'fixture'):
    data = _load(arg).experiment_kwargs.config.data.to_dict()
    assert set(data) == set(expected)
    changed = {k for k in data if data[k] != expected[k]}
    assert changed <= fixture_fields, (arg, changed)
    assert data['data_dir'] == _H5_DIR
    assert data['input_shape'] == (data['num_points'], 3)
    assert data['num_train_examples'] == modelnet40.num_examples(
        'train', _load(arg).experiment_kwargs.config.data)


def test_head_follows_the_data_class_count():
  assert _load('debug').experiment_kwargs.config.model.decoder.num_classes == (
      modelnet40.NUM_CLASSES)
  exp = _load('fixture').experiment_kwargs.config
  assert exp.model.decoder.num_classes == _FIXTURE_CLASSES
  exp.data.num_classes = 7
  assert exp.model.decoder.num_classes == 7


def test_debug_and_fixture_presets_exclude_each_other():
  with pytest.raises(ValueError, match='exclude each other'):
    _load('debug,fixture')
