"""Helpers shared by the preprocessor tests."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from perceiver_jax.ops import byte_array
from perceiver_jax.modules import position_encoding
from perceiver_jax.modules import preprocessors


def run(make, inputs, *, is_training=False, seed=0):
  """Builds `make()` in a transform; returns ((x, mask), params)."""
  f = hk.transform(lambda x: make()(x, is_training=is_training))
  params = f.init(jax.random.key(seed), inputs)
  out = f.apply(params, jax.random.key(seed + 1), inputs)
  return out, params


def shape_of(make, input_shape, batch=2):
  """Byte array shape for per-example `input_shape`, via jax.eval_shape."""
  def spec(s):
    return jax.ShapeDtypeStruct((batch,) + tuple(s), jnp.float32)
  inputs = ({k: spec(v) for k, v in input_shape.items()}
            if isinstance(input_shape, dict) else spec(input_shape))
  f = hk.transform(lambda x: make()(x, is_training=False))
  rng = jax.random.key(0)
  params = jax.eval_shape(lambda x: f.init(rng, x), inputs)
  x, _ = jax.eval_shape(lambda p, x: f.apply(p, rng, x), params, inputs)
  # The cheap path must agree with the traced one.
  assert preprocessors.compute_output_shape(make, input_shape) == x.shape[1:]
  return x.shape


def grid_ff(grid, num_bands, max_resolution=None):
  """Fourier features of a grid, built point by point (no grid helper)."""
  positions = position_encoding.build_linear_positions(grid)
  return position_encoding.fourier_features(
      positions.reshape(-1, len(grid)), num_bands, max_resolution or grid)


def uniform(shape, seed=0):
  """Inputs uniform in [0, 1) of `shape`."""
  return jax.random.uniform(jax.random.key(seed), shape)


def check_split_positions(make, shape):
  """`make(True)`'s split byte array holds `make(False)`'s dense one."""
  inputs = uniform((2,) + shape)
  (split, _), _ = run(lambda: make(True), inputs)
  (dense, _), _ = run(lambda: make(False), inputs)
  assert isinstance(split, byte_array.SplitByteArray)
  assert split.shared.ndim == 2 and split.shape == dense.shape
  np.testing.assert_array_equal(split.dense(), dense)
