"""Tests of position grids, Fourier features and learned encodings."""

import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax.modules import position_encoding


def _reference_fourier(positions, num_bands, max_resolution, concat_pos=True,
                       sine_only=False):
  """Direct re-derivation of P1 Sec. 3.2 with explicit loops, float64."""
  positions = np.asarray(positions, np.float64)
  *lead, d = positions.shape
  flat = positions.reshape(-1, d)
  rows = []
  for x in flat:
    raw, sines, cosines = [], [], []
    for i in range(d):
      raw.append(x[i])
      for k in range(num_bands):
        if num_bands == 1:
          f = 1.0
        else:
          f = 1.0 + k * (max_resolution[i] / 2.0 - 1.0) / (num_bands - 1)
        sines.append(math.sin(math.pi * f * x[i]))
        cosines.append(math.cos(math.pi * f * x[i]))
    row = (raw if concat_pos else []) + sines + ([] if sine_only else cosines)
    rows.append(row)
  return np.array(rows).reshape(*lead, -1)


class TestBuildLinearPositions:

  def test_grid_values(self):
    pos = position_encoding.build_linear_positions((3, 5))
    assert pos.shape == (3, 5, 2) and pos.dtype == np.float32
    np.testing.assert_allclose(pos[:, 0, 0], [-1.0, 0.0, 1.0])
    np.testing.assert_allclose(pos[0, :, 1], [-1.0, -0.5, 0.0, 0.5, 1.0])
    # Dimension 0 varies along axis 0 only, dimension 1 along axis 1 only.
    np.testing.assert_allclose(pos[:, 3, 0], pos[:, 0, 0])
    np.testing.assert_allclose(pos[2, :, 1], pos[0, :, 1])

  def test_output_range_and_3d(self):
    pos = position_encoding.build_linear_positions((2, 3, 4), (0.0, 2.0))
    assert pos.shape == (2, 3, 4, 3)
    assert pos.min() == 0.0 and pos.max() == 2.0
    np.testing.assert_allclose(pos[1, 2, 3], [2.0, 2.0, 2.0])

  def test_single_element_dimension(self):
    pos = position_encoding.build_linear_positions((1, 2))
    np.testing.assert_allclose(pos[0, :, 0], [-1.0, -1.0])

  @pytest.mark.parametrize('dims', [(), (0, 3), (4, -1)])
  def test_bad_dims(self, dims):
    with pytest.raises(ValueError, match='index_dims'):
      position_encoding.build_linear_positions(dims)


class TestFourierFeatures:

  def test_matches_loop_reference(self):
    rng = np.random.default_rng(0)
    positions = rng.uniform(-1, 1, (4, 3, 2))
    out = position_encoding.fourier_features(positions, 5, (10, 7))
    assert isinstance(out, np.ndarray)
    assert out.shape == (4, 3, 2 * (2 * 5 + 1))
    np.testing.assert_allclose(out, _reference_fourier(positions, 5, (10, 7)),
                               atol=1e-12)

  @pytest.mark.parametrize('concat_pos, sine_only, channels', [
      (True, False, 3 * 9), (True, True, 3 * 5),
      (False, False, 3 * 8), (False, True, 3 * 4)])
  def test_variants_match_reference(self, concat_pos, sine_only, channels):
    positions = position_encoding.build_linear_positions((3, 2, 2))
    out = position_encoding.fourier_features(
        positions, 4, 6, concat_pos=concat_pos, sine_only=sine_only)
    assert out.shape == (3, 2, 2, channels)
    assert channels == position_encoding.num_fourier_channels(
        3, 4, concat_pos=concat_pos, sine_only=sine_only)
    np.testing.assert_allclose(
        out, _reference_fourier(positions, 4, (6, 6, 6), concat_pos,
                                sine_only), atol=1e-6)

  def test_channel_order(self):
    """[raw (d), sines dimension-major (d*K), cosines (d*K)]."""
    x = np.array([[0.3, -0.7]])
    k, mu = 3, (8, 12)
    out = position_encoding.fourier_features(x, k, mu)[0]
    freqs = [np.linspace(1, mu[0] / 2, k), np.linspace(1, mu[1] / 2, k)]
    np.testing.assert_allclose(out[:2], x[0])
    for i in range(2):
      for band in range(k):
        phase = np.pi * freqs[i][band] * x[0, i]
        assert out[2 + i * k + band] == pytest.approx(np.sin(phase))
        assert out[2 + 2 * k + i * k + band] == pytest.approx(np.cos(phase))
    # Top frequency is the Nyquist frequency mu/2.
    assert freqs[1][-1] == 6.0

  def test_jax_input_gives_jax_output(self):
    positions = np.random.default_rng(1).uniform(-1, 1, (7, 3))
    out_np = position_encoding.fourier_features(positions, 8, 20)
    out_jax = jax.jit(lambda p: position_encoding.fourier_features(
        p, 8, 20))(jnp.asarray(positions, jnp.float32))
    assert isinstance(out_jax, jax.Array)
    assert out_jax.dtype == jnp.float32
    np.testing.assert_allclose(out_jax, out_np, atol=1e-5)

  def test_numpy_dtype_follows_input(self):
    pos32 = np.zeros((2, 1), np.float32)
    assert position_encoding.fourier_features(pos32, 2, 4).dtype == np.float32
    assert position_encoding.fourier_features(
        pos32.astype(np.float64), 2, 4).dtype == np.float64

  def test_imagenet_channels(self):
    positions = position_encoding.build_linear_positions((224, 224))
    spec = jax.eval_shape(
        lambda p: position_encoding.fourier_features(p, 64, 224),
        jax.ShapeDtypeStruct(positions.shape, jnp.float32))
    assert spec.shape == (224, 224, 258)

  def test_grid_features_cached_and_read_only(self):
    a = position_encoding.grid_fourier_features((4, 5), 3, (4, 5))
    b = position_encoding.grid_fourier_features((4, 5), 3, (4, 5))
    assert a is b and not a.flags.writeable
    assert a.shape == (20, 2 * 7) and a.dtype == np.float32
    positions = position_encoding.build_linear_positions((4, 5))
    np.testing.assert_allclose(
        a, _reference_fourier(positions, 3, (4, 5)).reshape(20, -1),
        atol=1e-6)

  def test_bad_arguments(self):
    positions = np.zeros((3, 2))
    with pytest.raises(ValueError, match='num_bands'):
      position_encoding.fourier_features(positions, 0, 4)
    with pytest.raises(ValueError, match=r'max_resolution=\(4, 4, 4\)'):
      position_encoding.fourier_features(positions, 2, (4, 4, 4))
    with pytest.raises(ValueError, match='max_resolution must be positive'):
      position_encoding.fourier_features(positions, 2, (4, 0))


class TestLearnedPositionEncoding:

  def test_shape_and_init_scale(self):
    scale = 0.5
    f = hk.transform(lambda b: position_encoding.LearnedPositionEncoding(
        300, 64, init_scale=scale, name='pos')(b))
    params = f.init(jax.random.key(0), 3)
    embs = params['pos']['pos_embs']
    assert embs.shape == (300, 64)
    out = f.apply(params, None, 3)
    assert out.shape == (3, 300, 64)
    np.testing.assert_array_equal(out[0], embs)
    np.testing.assert_array_equal(out[2], embs)
    # Truncated at +-2 stddev: std = scale * sqrt(1 - 4 phi(2) / erf(2/sqrt2)).
    phi2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
    truncated_std = math.sqrt(1 - 4 * phi2 / math.erf(2 / math.sqrt(2)))
    assert float(jnp.std(embs)) == pytest.approx(scale * truncated_std,
                                                 rel=0.02)
    assert float(jnp.max(jnp.abs(embs))) <= 2 * scale + 1e-6
    assert abs(float(jnp.mean(embs))) < 0.02

  def test_bad_arguments(self):
    def build(*args, **kwargs):
      return hk.transform(lambda: position_encoding.LearnedPositionEncoding(
          *args, **kwargs)(1)).init(jax.random.key(0))
    with pytest.raises(ValueError, match='index_dim'):
      build(0, 4)
    with pytest.raises(ValueError, match='init_scale'):
      build(4, 4, init_scale=0.0)
