"""The P1 baselines: parameter counts, shapes and permutation behaviour."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax.modules import baselines


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
