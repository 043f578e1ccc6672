"""Paper parameter counts and FLOPs, and permutation invariance end to end."""

import functools

import haiku as hk
import jax
import ml_collections
import numpy as np
import pytest

from perceiver_jax.analysis import summary as summary_lib
from tests import helpers
from tests import test_configs

# (config file, preset) -> (params in millions, GFLOPs or None) from P1/P2.
PAPER = {
    ('imagenet.py', None): (44.9, 707.2),
    ('imagenet.py', 'unshared'): (326.2, None),
    ('imagenet.py', 'one_cross'): (42.1, 404.3),
    ('imagenet.py', 'p2'): (48.4, None),
    ('audioset.py', 'p2'): (21.0, None),
}


@functools.lru_cache(maxsize=None)
def _summary(name, arg):
  """summary_lib.summarize of a config (traced once; several tests read the
  P1 ImageNet one). Callers must not modify the dict."""
  return summary_lib.summarize(
      test_configs._load(name, arg).experiment_kwargs.config)  # pylint: disable=protected-access


@pytest.mark.parametrize('name, arg', sorted(PAPER, key=str))
def test_paper_model_sizes(name, arg):
  params_m, gflops = PAPER[(name, arg)]
  summary = _summary(name, arg)
  assert abs(summary['params'] / 1e6 - params_m) < 0.1, summary
  if gflops is not None:
    # The paper counts the direct formulation (byte array projected to k, v).
    assert abs(summary['paper_forward_flops'] / 1e9 / gflops - 1) < 0.02


# The released Perceiver IO ImageNet models' exact sizes (deepmind-research
# checkpoints; see perceiver_jax/interop/deepmind.py).
RELEASED = {'p2': 48_440_627, 'p2,prep=conv': 48_646_522,
            'p2,pos=learned': 62_255_848}


@pytest.mark.parametrize('arg', sorted(RELEASED))
def test_released_model_sizes_exactly(arg):
  from perceiver_jax import models  # pylint: disable=g-import-not-at-top
  model = test_configs._load('imagenet.py', arg).experiment_kwargs.config.model  # pylint: disable=protected-access
  forward = models.make_forward_with_state(model)
  params, state = jax.eval_shape(
      lambda x: forward.init(jax.random.key(0), x, is_training=True),
      jax.ShapeDtypeStruct((1, 224, 224, 3), jax.numpy.float32))
  assert sum(x.size for x in jax.tree.leaves(params)) == RELEASED[arg]
  # Only the conv model has state: BatchNorm's mean and variance EMAs.
  assert models.has_state(model) == (arg == 'p2,prep=conv')
  assert sorted(state) == ([
      'preprocessor/batchnorm/~/mean_ema', 'preprocessor/batchnorm/~/var_ema']
                           if arg == 'p2,prep=conv' else [])


def test_make_forward_refuses_a_model_with_state():
  from perceiver_jax import models  # pylint: disable=g-import-not-at-top
  config = test_configs._load('imagenet.py', 'p2,prep=conv,debug')  # pylint: disable=protected-access
  with pytest.raises(ValueError, match='make_forward_with_state'):
    models.make_forward(config.experiment_kwargs.config.model)
  # A stateless model: the same params either way, and no state.
  model = test_configs._load('imagenet.py', 'p2,debug').experiment_kwargs.config.model  # pylint: disable=protected-access
  images = jax.numpy.zeros((1, 16, 16, 3))
  params = models.make_forward(model).init(jax.random.key(0), images,
                                           is_training=True)
  params2, state = models.make_forward_with_state(model).init(
      jax.random.key(0), images, is_training=True)
  assert state == {}
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_reformulated_cross_attention_cuts_p1_imagenet_flops():
  """The default ('auto') formulation: same parameters, >= 12% fewer FLOPs."""
  summary = _summary('imagenet.py', None)
  assert abs(summary['params'] / 1e6 - 44.9) < 0.1
  assert summary['forward_flops'] <= 0.88 * 707.2e9, summary


def test_imagenet_byte_array_is_paper_shape():
  summary = _summary('imagenet.py', None)
  assert summary['byte_array'] == [50176, 261]


def test_permuted_pipeline_gives_the_same_logits():
  """A Perceiver (FF) cannot tell a fixed pixel permutation apart."""
  from perceiver_jax import models  # pylint: disable=g-import-not-at-top
  plain = test_configs._load('imagenet.py', 'debug')  # pylint: disable=protected-access
  permuted = test_configs._load('imagenet_permuted.py', 'debug')  # pylint: disable=protected-access
  f = models.make_forward(plain.experiment_kwargs.config.model)
  g = models.make_forward(permuted.experiment_kwargs.config.model)
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
  params = f.init(jax.random.key(1), images, is_training=False)
  assert jax.tree.structure(params) == jax.tree.structure(
      g.init(jax.random.key(1), images, is_training=False))
  np.testing.assert_allclose(
      f.apply(params, None, images, is_training=False),
      g.apply(params, None, images, is_training=False), atol=1e-5)
  # ...while the byte arrays themselves really differ.
  pre = [hk.transform(lambda x, c=c: models.build_preprocessor(
      c.experiment_kwargs.config.model.preprocessor, name='preprocessor')(
          x, is_training=False)[0]) for c in (plain, permuted)]
  a, b = (p.apply({}, None, images) for p in pre)
  assert not np.allclose(a, b)
  np.testing.assert_allclose(np.sort(a, axis=1), np.sort(b, axis=1))


@pytest.mark.parametrize('chunk_size', [None, 100])
def test_cpu_backend_gives_the_reference_model(chunk_size):
  """model.backend='cpu' (OpenBLAS products, fused attention) and
  'reference' (plain jnp): the same loss and gradients, with and without
  chunked cross-attention."""
  helpers.require_cpu_backend()
  from perceiver_jax import models  # pylint: disable=g-import-not-at-top
  model = test_configs._load(  # pylint: disable=protected-access
      'imagenet.py', 'debug').experiment_kwargs.config.model
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
  results, calls = {}, {}
  for backend in ('reference', 'cpu'):
    config = model.copy_and_resolve_references()
    config.backend = backend
    config.encoder.cross_attention_chunk_size = chunk_size
    forward = models.make_forward(config)
    params = forward.init(jax.random.key(1), images, is_training=True)
    loss = lambda p: jax.numpy.sum(
        forward.apply(p, None, images, is_training=True) ** 2)
    step = jax.jit(jax.value_and_grad(loss))
    hlo = step.lower(params).as_text()
    calls[backend] = (hlo.count('perceiver_jax_cpu_matmul'),
                      hlo.count('perceiver_jax_cpu_attention'))
    results[backend] = step(params)
  assert calls['reference'] == (0, 0)
  assert calls['cpu'][0] > 0 and calls['cpu'][1] > 0
  (loss, grads), (want_loss, want_grads) = results['cpu'], results['reference']
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  # Against the largest gradient: some are 0 up to rounding (the key bias
  # cancels in the softmax), and rounding differs between the two.
  scale = max(np.abs(g).max() for g in jax.tree.leaves(want_grads))
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale)


def test_unknown_and_removed_backend_fields_are_rejected():
  from perceiver_jax import models  # pylint: disable=g-import-not-at-top
  model = test_configs._load(  # pylint: disable=protected-access
      'imagenet.py', 'debug').experiment_kwargs.config.model
  config = model.copy_and_resolve_references()
  config.backend = 'blas'
  with pytest.raises(ValueError, match=r"model.backend='blas'"):
    models.make_forward(config)
  for old in ('cpu_matmul', 'fused_cpu_attention'):
    config = ml_collections.ConfigDict(  # A config of an earlier version.
        {**model.to_dict(), old: 'auto'})
    with pytest.raises(ValueError,
                       match=rf'model.{old} was removed; set model.backend'):
      models.make_forward(config)


# P1's baselines at 3 channels and 1,000 classes (hk.nets' ResNet-50; ViT-B/16
# of Dosovitskiy et al. 2021), counted from shapes by model_summary.
BASELINE_PARAMS = {'baseline=resnet50': 25_557_032,
                   'baseline=vit_b16': 86_567_656}


@pytest.mark.parametrize('arg', sorted(BASELINE_PARAMS))
def test_baseline_paper_sizes(arg):
  exp = test_configs._load('imagenet.py', arg).experiment_kwargs.config  # pylint: disable=protected-access
  summary = summary_lib.summarize(exp)
  assert summary['params'] == BASELINE_PARAMS[arg]
  assert summary['params_m'] == round(BASELINE_PARAMS[arg] / 1e6, 2)
  assert summary['byte_array'] == [224 * 224, 3]
  assert 'latents' not in summary
  # Their published costs: ResNet-50 4.1 and ViT-B/16 17.6 G multiply-adds.
  gmacs = {'baseline=resnet50': 4.1, 'baseline=vit_b16': 17.6}[arg]
  assert abs(summary['forward_flops'] / 2e9 / gmacs - 1) < 0.03, summary


# P1 Tab. 4's baselines on ModelNet40 (configs/modelnet40.py): 387 Fourier
# channels per point and a 40-way head. ResNet-50's stem gains
# 7 * 7 * (387 - 3) * 64 weights and its head loses 960 * 2,049; the ViT's
# patch embedding reads 2 * 2 * 387 values instead of 16 * 16 * 3.
MODELNET40_BASELINE_PARAMS = {
    'baseline=resnet50_ff': 25_557_032 + 7 * 7 * 384 * 64 - 960 * 2049,
    'baseline=vit_b2_ff': (86_567_656 - (16 * 16 * 3 - 2 * 2 * 387) * 768 -
                           960 * 769 + (485 - 197) * 768),
}


@pytest.mark.parametrize('arg', sorted(MODELNET40_BASELINE_PARAMS))
def test_modelnet40_baseline_sizes(arg):
  exp = test_configs._load('modelnet40.py', arg).experiment_kwargs.config  # pylint: disable=protected-access
  summary = summary_lib.summarize(exp)
  assert summary['params'] == MODELNET40_BASELINE_PARAMS[arg]
  assert summary['byte_array'] == [44 * 44, 387]


def test_fourier_features_feed_the_baselines():
  """261 channels: the ResNet's stem and the ViT's patch embedding widen."""
  for arg, extra in (('baseline=resnet50_ff', 7 * 7 * 258 * 64),
                     ('baseline=vit_b16_ff', 16 * 16 * 258 * 768)):
    exp = test_configs._load('imagenet.py', arg).experiment_kwargs.config  # pylint: disable=protected-access
    model = exp.model
    forward = summary_lib.make_forward(model)
    params = jax.eval_shape(
        lambda x, m=forward: m.init(jax.random.key(0), x, is_training=False),
        summary_lib.input_spec(exp.data))
    count = sum(x.size for x in jax.tree.leaves(params))
    assert count == BASELINE_PARAMS[arg[:-3]] + extra


def test_resnet_baseline_has_state():
  from perceiver_jax import models  # pylint: disable=g-import-not-at-top
  model = test_configs._load('digits.py', 'baseline=resnet,debug').experiment_kwargs.config.model  # pylint: disable=protected-access
  assert models.has_state(model)
  with pytest.raises(ValueError, match='make_forward_with_state'):
    models.make_forward(model)
  forward = models.make_forward_with_state(model)
  images = jax.ShapeDtypeStruct((4, 8, 8, 1), jax.numpy.float32)
  params, state = jax.eval_shape(
      lambda x: forward.init(jax.random.key(0), x, is_training=True), images)
  assert any('batchnorm' in name for name in state)
  logits, new_state = jax.eval_shape(
      lambda p, s, x: forward.apply(p, s, None, x, is_training=True),
      params, state, images)
  assert logits.shape == (4, 10)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  for kind in ('vit_ff', 'transformer_ff'):
    assert not models.has_state(test_configs._load(  # pylint: disable=protected-access
        'digits.py', f'baseline={kind}').experiment_kwargs.config.model)


def test_bad_baseline_sections_are_reported():
  from perceiver_jax import models  # pylint: disable=g-import-not-at-top
  model = test_configs._load('digits.py', 'baseline=vit_ff,debug').experiment_kwargs.config.model  # pylint: disable=protected-access
  images = jax.numpy.zeros((1, 8, 8, 1))
  bad_type = model.copy_and_resolve_references()
  bad_type.type = 'mlp'
  with pytest.raises(ValueError, match="Unknown model type 'mlp'"):
    models.make_forward(bad_type).init(jax.random.key(0), images,
                                       is_training=False)
  patches = model.copy_and_resolve_references()
  patches.preprocessor.prep_type = 'patches'
  with pytest.raises(ValueError, match="prep_type='pixels'"):
    models.make_forward(patches).init(jax.random.key(0), images,
                                      is_training=False)


def test_point_cloud_grid_baselines_need_a_matching_grid():
  from perceiver_jax import models  # pylint: disable=g-import-not-at-top
  model = test_configs._load('modelnet40.py', 'baseline=vit_b2_ff,debug').experiment_kwargs.config.model  # pylint: disable=protected-access
  points = jax.numpy.zeros((2, 64, 3))
  forward = models.make_forward(model)
  logits = jax.eval_shape(
      lambda x: forward.apply(forward.init(jax.random.key(0), x,
                                           is_training=False),
                              None, x, is_training=False), points)
  assert logits.shape == (2, 40)
  with pytest.raises(ValueError, match=r'M=60 positions; the grid \(8, 8\)'):
    forward.init(jax.random.key(0), points[:, :60], is_training=False)
  no_grid = model.copy_and_resolve_references()
  with no_grid.unlocked():
    del no_grid['grid']
  with pytest.raises(ValueError, match='or a model.grid'):
    models.make_forward(no_grid).init(jax.random.key(0), points,
                                      is_training=False)
  transformer = test_configs._load('modelnet40.py', 'baseline=transformer_44_ff,debug').experiment_kwargs.config.model.copy_and_resolve_references()  # pylint: disable=protected-access
  transformer.grid = (8, 8)
  with pytest.raises(ValueError, match='reads the byte array as a set'):
    models.make_forward(transformer).init(jax.random.key(0), points,
                                          is_training=False)
