"""Tests for the Perceiver encoder, its weight sharing, and the decoders."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax.modules import perceiver

_SMALL = dict(num_latents=8, latent_dim=16, num_self_attends_per_block=2,
              num_self_heads=2)


def _encoder_params(inputs_shape=(2, 12, 6), **kwargs):
  f = hk.transform(lambda x: perceiver.PerceiverEncoder(
      name='encoder', **{**_SMALL, **kwargs})(x, is_training=False))
  return jax.eval_shape(f.init, jax.random.key(0),
                        jax.ShapeDtypeStruct(inputs_shape, jnp.float32))


def _modules(params):
  """Top-level submodule names under the encoder, e.g. 'cross_attend_0'."""
  return sorted({k.split('/')[2] for k in params if k.count('/') > 2})


def _num_params(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_encoder_output_shape():
  f = hk.transform(lambda x: perceiver.PerceiverEncoder(
      num_cross_attends=2, **_SMALL)(x, is_training=False))
  x = jnp.ones((3, 12, 6))
  z = f.apply(f.init(jax.random.key(0), x), None, x)
  assert z.shape == (3, 8, 16)


@pytest.mark.parametrize('repeats', [2, 3, 5])
def test_paper_sharing_is_independent_of_repeats(repeats):
  params = _encoder_params(num_cross_attends=repeats)
  assert _modules(params) == [
      'cross_attend_0', 'cross_attend_1', 'latent_transformer']
  assert _num_params(params) == _num_params(_encoder_params(
      num_cross_attends=2))


def test_unshared_weights_grow_with_repeats():
  three = _encoder_params(num_cross_attends=3, share_cross_attends=False,
                          share_latent_transformer=False)
  assert _modules(three) == [
      'cross_attend_0', 'cross_attend_1', 'cross_attend_2',
      'latent_transformer_0', 'latent_transformer_1', 'latent_transformer_2']
  shared = _encoder_params(num_cross_attends=3)
  one = _encoder_params(num_cross_attends=1)
  per_cross = _num_params(shared) - _num_params(one)
  per_transformer = _num_params(_encoder_params(
      num_cross_attends=1, num_blocks=2, share_latent_transformer=False)
                                ) - _num_params(one)
  assert _num_params(three) == (_num_params(one) + 2 * per_cross +
                                2 * per_transformer)


def test_perceiver_io_encoder_is_one_cross_attend():
  params = _encoder_params(num_cross_attends=1, num_blocks=4)
  assert _modules(params) == ['cross_attend_0', 'latent_transformer']


def test_encoder_is_permutation_invariant():
  f = hk.transform(lambda x: perceiver.PerceiverEncoder(
      num_cross_attends=2, **_SMALL)(x, is_training=False))
  x = jax.random.normal(jax.random.key(1), (2, 30, 6))
  params = f.init(jax.random.key(0), x)
  perm = np.random.default_rng(0).permutation(30)
  np.testing.assert_allclose(f.apply(params, None, x),
                             f.apply(params, None, x[:, perm]), atol=1e-5)


def test_mask_hides_padding():
  f = hk.transform(lambda x, m: perceiver.PerceiverEncoder(
      num_cross_attends=1, **_SMALL)(x, is_training=False, mask=m))
  x = jax.random.normal(jax.random.key(1), (1, 10, 6))
  padded = jnp.concatenate([x, 100 * jnp.ones((1, 5, 6))], axis=1)
  mask = jnp.arange(15)[None] < 10
  params = f.init(jax.random.key(0), x, None)
  np.testing.assert_allclose(f.apply(params, None, x, None),
                             f.apply(params, None, padded, mask), atol=1e-5)


@pytest.mark.parametrize('kwargs, match', [
    (dict(latent_dim=10, num_self_heads=4), 'latent_dim=10'),
    (dict(num_cross_attends=3, num_blocks=2), 'num_blocks=2'),
    (dict(num_latents=0), 'num_latents'),
])
def test_bad_hyperparameters_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _encoder_params(**kwargs)


def test_cross_heads_must_divide_channels():
  with pytest.raises(ValueError, match='num_cross_heads=4'):
    _encoder_params(num_cross_heads=4)


def test_decoders():
  z = jax.random.normal(jax.random.key(0), (2, 8, 16))

  def run(make):
    f = hk.transform(lambda z: make()(z, is_training=False))
    return f.apply(f.init(jax.random.key(0), z), None, z)

  assert run(lambda: perceiver.AverageDecoder(7)).shape == (2, 7)
  assert run(lambda: perceiver.ClassificationQueryDecoder(
      7, query_channels=16)).shape == (2, 7)
  assert run(lambda: perceiver.BasicQueryDecoder(
      3, (4, 5), query_type='fourier', num_freq_bands=2)).shape == (2, 20, 3)
  assert run(lambda: perceiver.BasicQueryDecoder(
      3, (6,), query_channels=16)).shape == (2, 6, 3)
  with pytest.raises(ValueError, match="'sine'"):
    run(lambda: perceiver.BasicQueryDecoder(3, (6,), query_type='sine'))
