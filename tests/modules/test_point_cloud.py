"""Tests of the point cloud preprocessor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax.modules import point_cloud
from perceiver_jax.modules import position_encoding
from tests.modules import preprocessor_testing


def test_paper_size():
  shape = preprocessor_testing.shape_of(
      lambda: point_cloud.PointCloudPreprocessor(64, 1120), (2048, 3))
  assert shape == (2, 2048, 387)


def test_contents():
  points = jax.random.uniform(jax.random.key(0), (2, 50, 3), minval=-1.0,
                              maxval=1.0)
  (x, mask), params = preprocessor_testing.run(
      lambda: point_cloud.PointCloudPreprocessor(8, 1120), points)
  assert mask is None and not params and x.shape == (2, 50, 3 * 17)
  expected = position_encoding.fourier_features(
      np.asarray(points, np.float64), 8, 1120)
  # float32 phases up to ~1760 rad: ~1e-4 absolute error.
  np.testing.assert_allclose(x, expected, atol=5e-4)


@pytest.mark.parametrize('make, shape, match', [
    (lambda: point_cloud.PointCloudPreprocessor(4, (10, 10)), (1, 5, 3),
     'has 2 entries but the points have 3 coordinates'),
    (lambda: point_cloud.PointCloudPreprocessor(4, None), (1, 5, 3),
     'max_resolution'),
])
def test_errors(make, shape, match):
  with pytest.raises(ValueError, match=match):
    preprocessor_testing.run(make, preprocessor_testing.uniform(shape))


def test_integer_inputs_rejected():
  with pytest.raises(ValueError, match='floating-point inputs.*uint8'):
    preprocessor_testing.run(lambda: point_cloud.PointCloudPreprocessor(2),
                             jnp.zeros((1, 5, 3), jnp.uint8))
