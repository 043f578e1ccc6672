"""P1's baselines through the classification experiment, on digits.

ModelNet40's (Tab. 4) take a step and evaluate on the committed point-cloud
fixture.

Each digits baseline takes a training step and evaluates through
experiments/classification.py (the ResNet with its BatchNorm state), and
its eval metrics are compared with and without the permutation, with the
same params and state: P1 Tab. 2's point. The Perceiver and the Transformer
read the byte array as a set, so the permutation (applied after the Fourier
features) leaves their metrics unchanged to float rounding; the ResNet and
the ViT read it as the image grid, which it scrambles.
"""

import jax
import numpy as np
import pytest

from experiments import classification
from perceiver_jax.training import parallel
from tests import test_configs


def _experiment(arg, name='digits.py'):
  config = test_configs._load(name, arg)  # pylint: disable=protected-access
  return classification.ClassificationExperiment(
      'train', jax.random.PRNGKey(0), config.experiment_kwargs.config)


def _steps(n):
  return np.full([jax.local_device_count()], n, np.int32)


def _rng():
  return jax.random.split(jax.random.PRNGKey(1), jax.local_device_count())


def _evaluate_permuted(arg, params, state):
  """Eval results of `arg`'s permuted model with the given params, state."""
  permuted = _experiment(f'{arg},permuted,debug')
  # pylint: disable-next=protected-access
  permuted._params, permuted._state = params, state
  return permuted.evaluate(global_step=_steps(1), rng=_rng())


def _same_metrics(a, b):
  assert a['num_examples'] == b['num_examples'] == 300
  return (abs(a['loss'] - b['loss']) < 1e-5 * max(1.0, abs(a['loss'])) and
          abs(a['top_1_acc'] - b['top_1_acc']) < 1e-9)


# baseline -> whether the permutation leaves its eval metrics unchanged
# (None: not compared; the ResNet without Fourier features is compiled
# once, for the training step and evaluation).
BASELINES = {'resnet': None, 'resnet_ff': False, 'vit_ff': False,
             'transformer_ff': True}


@pytest.mark.parametrize('baseline', sorted(BASELINES))
def test_baseline_trains_evaluates_and_meets_the_permutation(baseline):
  arg = f'baseline={baseline}'
  experiment = _experiment(f'{arg},debug')
  stateful = baseline.startswith('resnet')
  assert experiment.model_has_state == stateful
  assert ('state' in experiment.CHECKPOINT_ATTRS.values()) == stateful
  # One step: it also moves the ResNet's head off its zero initialisation.
  scalars = experiment.step(global_step=_steps(0), rng=_rng())
  assert np.isfinite(scalars['loss']) and scalars['grad_norm'] > 0
  # pylint: disable=protected-access
  params, state = experiment._params, experiment._state
  # pylint: enable=protected-access
  if stateful:
    names = [jax.tree_util.keystr(path) for path, _ in
             jax.tree_util.tree_flatten_with_path(state)[0]]
    assert any('initial_batchnorm' in n and 'mean_ema' in n for n in names)
    # Averaged over the devices after the step: equal on all 8.
    for leaf in jax.tree.leaves(state):
      leaf = np.asarray(leaf)
      np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0],
                                                          leaf.shape))
    means = [np.asarray(parallel.unreplicate(x)) for p, x in
             jax.tree_util.tree_flatten_with_path(state)[0]
             if 'mean_ema' in jax.tree_util.keystr(p) and
             'average' in jax.tree_util.keystr(p)]
    assert any(np.any(m != 0) for m in means)  # Moved off the zero init.
  else:
    assert state == {}
  plain = experiment.evaluate(global_step=_steps(1), rng=_rng())
  assert plain['num_examples'] == 300 and np.isfinite(plain['loss'])
  if BASELINES[baseline] is None:
    return
  permuted = _evaluate_permuted(arg, params, state)
  assert _same_metrics(plain, permuted) == BASELINES[baseline], (plain,
                                                                 permuted)
  if not BASELINES[baseline]:
    assert abs(plain['loss'] - permuted['loss']) > 1e-4, (plain, permuted)


def test_perceiver_ignores_the_permutation():
  experiment = _experiment('debug')
  batch = next(experiment._build_input(is_training=True))  # pylint: disable=protected-access
  experiment._initialize_params(batch)  # pylint: disable=protected-access
  plain = experiment.evaluate(global_step=_steps(0), rng=_rng())
  permuted = _evaluate_permuted('', experiment._params, experiment._state)  # pylint: disable=protected-access
  assert _same_metrics(plain, permuted), (plain, permuted)


@pytest.mark.parametrize('baseline', ['vit_b2_ff', 'transformer_44_ff'])
def test_modelnet40_baseline_trains_and_evaluates(baseline):
  """The ViT (points on a grid) and the Transformer (points as a set)."""
  experiment = _experiment(f'baseline={baseline},debug', 'modelnet40.py')
  batch = next(experiment._build_input(is_training=True))  # pylint: disable=protected-access
  assert batch['inputs'].shape[-2:] == (64, 3)
  scalars = experiment.step(global_step=_steps(0), rng=_rng())
  assert np.isfinite(scalars['loss']) and scalars['grad_norm'] > 0
  result = experiment.evaluate(global_step=_steps(1), rng=_rng())
  assert result['num_examples'] == 40 and np.isfinite(result['loss'])
