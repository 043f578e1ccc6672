"""The P1 baselines: parameter counts, shapes and permutation behaviour."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax.modules import baselines
from perceiver_jax.modules import preprocessors


def _count(make, inputs_shape):
  def forward(x):
    return make()(x, is_training=True)
  transformed = hk.transform_with_state(forward)
  params, _ = jax.eval_shape(
      transformed.init, jax.random.key(0),
      jax.ShapeDtypeStruct(inputs_shape, jnp.float32))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def test_vit_b16_has_86_57m_parameters():
  count = _count(lambda: baselines.ViT(1000, (224, 224), patch_size=16),
                 (1, 224 * 224, 3))
  assert count == 86_567_656


def test_vit_b16_with_fourier_features_embeds_261_channel_patches():
  count = _count(lambda: baselines.ViT(1000, (224, 224), patch_size=16),
                 (1, 224 * 224, 261))
  assert count == 86_567_656 + 16 * 16 * (261 - 3) * 768


def test_resnet50_has_25_56m_parameters():
  count = _count(lambda: baselines.ResNet50(1000, (224, 224)),
                 (1, 224 * 224, 3))
  assert count == 25_557_032


def _apply(make, x, rng=jax.random.key(0)):
  transformed = hk.transform_with_state(
      lambda x: make()(x, is_training=False))
  params, state = transformed.init(rng, x)
  return lambda y: transformed.apply(params, state, None, y)[0]


def _small_models():
  return {
      'vit': lambda: baselines.ViT(10, (8, 8), patch_size=2, hidden_size=32,
                                   num_layers=2, num_heads=4),
      'transformer': lambda: baselines.PixelTransformer(
          10, hidden_size=32, num_layers=2, num_heads=4),
  }


@pytest.mark.parametrize('name', ['vit', 'transformer'])
def test_shapes(name):
  x = jax.random.normal(jax.random.key(1), (3, 64, 19))
  assert _apply(_small_models()[name], x)(x).shape == (3, 10)


def test_transformer_ignores_a_permutation_of_the_positions():
  x = jax.random.normal(jax.random.key(1), (2, 64, 19))
  perm = np.random.default_rng(0).permutation(64)
  f = _apply(_small_models()['transformer'], x)
  np.testing.assert_allclose(f(x[:, perm]), f(x), rtol=1e-5, atol=1e-5)


def test_vit_sees_a_permutation_of_the_positions():
  x = jax.random.normal(jax.random.key(1), (2, 64, 19))
  perm = np.random.default_rng(0).permutation(64)
  f = _apply(_small_models()['vit'], x)
  assert np.max(np.abs(f(x[:, perm]) - f(x))) > 1e-3


def test_bad_shapes_are_reported():
  x = jnp.zeros((1, 64, 3))
  with pytest.raises(ValueError, match='does not divide'):
    _apply(lambda: baselines.ViT(10, (8, 8), patch_size=3), x)
  with pytest.raises(ValueError, match='divisible by num_heads'):
    _apply(lambda: baselines.PixelTransformer(10, hidden_size=30,
                                              num_heads=4), x)
  with pytest.raises(ValueError, match='grid'):
    _apply(_small_models()['vit'], jnp.zeros((1, 60, 3)))


def _small_resnet(**kwargs):
  return baselines.ResNet(
      10, (8, 8), blocks_per_group=(1, 1, 1, 1),
      channels_per_group=(4, 4, 8, 8), bottleneck=False,
      initial_conv_channels=4, initial_conv_kernel_shape=3,
      initial_conv_stride=1, strides=(1, 2, 2, 1), **kwargs)


def test_small_resnet_shapes_and_state():
  transformed = hk.transform_with_state(
      lambda x: _small_resnet()(x, is_training=True))
  x = jax.random.normal(jax.random.key(1), (3, 64, 19))
  params, state = transformed.init(jax.random.key(0), x)
  # A 3x3 stem on 19 channels, no bias.
  assert params['res_net/~/resnet/~/initial_conv']['w'].shape == (3, 3, 19, 4)
  assert any('batchnorm' in name for name in state)
  logits, _ = transformed.apply(params, state, None, x)
  assert logits.shape == (3, 10)


@pytest.mark.parametrize('zero_init_logits', [True, False])
def test_resnet_logits_start_at_zero_only_if_asked(zero_init_logits):
  """Haiku's zero head by default; under LAMB the digits preset needs a
  nonzero one (configs/digits.py)."""
  x = jnp.zeros((1, 64, 19))
  params, _ = hk.transform_with_state(lambda x: _small_resnet(
      zero_init_logits=zero_init_logits)(x, is_training=True)).init(
          jax.random.key(0), x)
  (w,), = [[v['w']] for k, v in params.items() if k.endswith('logits')]
  assert w.shape == (8, 10)
  assert np.all(w == 0) == zero_init_logits


def test_resnet_group_settings_are_checked():
  with pytest.raises(ValueError, match='blocks_per_group must be 4'):
    hk.transform(lambda: baselines.ResNet(10, (8, 8),
                                          blocks_per_group=(1, 1))).init(None)


def test_baseline_feeds_the_preprocessors_byte_array_to_the_network():
  """Baseline = preprocessor (Fourier features, permutation) + network made
  for the input's grid (8x8, from the images)."""
  def model(permute):
    def forward(images):
      pre = preprocessors.ImagePreprocessor(num_freq_bands=4,
                                            max_resolution=(8, 8))
      if permute:
        pre = preprocessors.PermutedPreprocessor(pre, seed=3)
      grids = []

      def make_network(grid):
        grids.append(grid)
        return _small_models()['vit']()

      logits = baselines.Baseline(pre, make_network)(images,
                                                     is_training=False)
      assert grids == [(8, 8)]
      return logits
    return hk.transform(forward)

  images = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
  params = model(False).init(jax.random.key(1), images)
  plain = model(False).apply(params, None, images)
  permuted = model(True).apply(params, None, images)
  assert plain.shape == (2, 10)
  # The ViT reads the permuted byte array as the (scrambled) grid.
  assert np.max(np.abs(plain - permuted)) > 1e-3


def test_bfloat16_policy_covers_the_baselines():
  """Params float32, compute bfloat16, logits float32 (training/precision)."""
  from perceiver_jax.training import precision  # pylint: disable=g-import-not-at-top
  assert baselines.Baseline in precision.MODEL_CLASSES
  seen = {}

  def forward(images):
    def make_network(grid):
      del grid
      net = _small_models()['transformer']()
      def run(x, is_training):
        seen['dtype'] = x.dtype
        return net(x, is_training=is_training)
      return run
    pre = preprocessors.ImagePreprocessor(num_freq_bands=4,
                                          max_resolution=(8, 8))
    return baselines.Baseline(pre, make_network)(images, is_training=False)

  transformed = hk.transform(forward)
  images = jnp.ones((2, 8, 8, 1))
  precision.apply_policy('bfloat16', precision.MODEL_CLASSES)
  try:
    params = transformed.init(jax.random.key(0), images)
    logits = transformed.apply(params, None, images)
  finally:
    precision.apply_policy('float32', precision.MODEL_CLASSES)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype('float32')}
  assert seen['dtype'] == jnp.bfloat16
  assert logits.dtype == jnp.float32
