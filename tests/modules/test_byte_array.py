"""Byte arrays held as per-example features plus shared position features."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax import ops
from perceiver_jax.modules import attention
from perceiver_jax.ops import byte_array


def _split(batch=2, m=11, features=3, shared=6, seed=0, offset=0.0):
  keys = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(keys[0], (batch, m, features)) * 3 + offset
  pos = jax.random.uniform(keys[1], (m, shared), minval=-1, maxval=1)
  return byte_array.SplitByteArray(x, pos)


def _concat(split):
  pos = np.broadcast_to(split.shared, split.features.shape[:2] +
                        split.shared.shape[-1:])
  return np.concatenate([split.features, pos], axis=-1)


def test_dense_is_the_concatenation():
  split = _split()
  assert split.shape == (2, 11, 9) and split.ndim == 3
  assert split.dtype == jnp.float32
  np.testing.assert_array_equal(split.dense(), _concat(split))
  np.testing.assert_array_equal(byte_array.dense(split), _concat(split))
  x = jnp.ones((2, 3, 4))
  assert byte_array.dense(x) is x


def test_take_reorders_both_parts():
  split = _split()
  perm = np.random.default_rng(0).permutation(11)
  taken = byte_array.take(split, perm)
  assert isinstance(taken, byte_array.SplitByteArray)
  np.testing.assert_array_equal(taken.dense(), _concat(split)[:, perm])
  dense = jnp.asarray(_concat(split))
  np.testing.assert_array_equal(byte_array.take(dense, perm), dense[:, perm])


@pytest.mark.parametrize('offset', [0.0, 1000.0])
@pytest.mark.parametrize('features, shared', [(3, 130), (1, 0), (5, 2)])
def test_standardize_matches_layer_norm_of_the_dense_array(offset, features,
                                                          shared):
  """Statistics from the parts, as LayerNorm's of the built rows (float64),
  also for rows far from zero, where E[x^2] - E[x]^2 would cancel."""
  split = _split(features=features, shared=shared, offset=offset)
  standardized = byte_array.standardize(split, 1e-5)
  assert standardized.shape == split.shape
  rows = _concat(split).astype(np.float64)
  mean = rows.mean(-1)
  inv_std = 1 / np.sqrt(rows.var(-1) + 1e-5)
  np.testing.assert_allclose(standardized.mean, mean, rtol=0,
                             atol=1e-6 * np.abs(rows).max())
  np.testing.assert_allclose(standardized.inv_std, inv_std, rtol=1e-5)
  want = (rows - mean[..., None]) * inv_std[..., None]
  np.testing.assert_allclose(standardized.dense(), want, atol=1e-4)


def test_layer_norm_standardize_takes_either_form():
  split = _split()
  f = hk.transform(lambda x: byte_array.dense(
      attention.LayerNorm(name='norm').standardize(x)[0]))
  params = f.init(jax.random.key(0), split)
  got = f.apply(params, None, split)
  want = f.apply(params, None, jnp.asarray(_concat(split)))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_gradients_flow_into_the_features():
  """A learned preprocessor (e.g. conv) gets the dense array's gradients."""
  split = _split()
  loss = lambda x: jnp.sum(jnp.sin(
      byte_array.standardize(byte_array.SplitByteArray(x, split.shared),
                             1e-5).dense()) * jnp.arange(9.0))
  dense_loss = lambda x: jnp.sum(jnp.sin(
      ops.reference.standardize(byte_array.SplitByteArray(
          x, split.shared).dense(), 1e-5)[0]) * jnp.arange(9.0))
  np.testing.assert_allclose(jax.grad(loss)(split.features),
                             jax.grad(dense_loss)(split.features), atol=1e-5)
