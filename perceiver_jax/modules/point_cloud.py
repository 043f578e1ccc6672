"""Point cloud preprocessor: coordinates -> their Fourier features.

The contract and shape letters are in `preprocessors`; here N: points per
example, d: coordinates per point.
"""

from typing import Optional, Sequence, Union

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from perceiver_jax.modules import position_encoding
from perceiver_jax.modules import preprocessors

# The preprocessors module's private helpers (validation, grids) serve
# every preprocessor module.
# pylint: disable=protected-access


class PointCloudPreprocessor(hk.Module):
  """Points [B, N, d] -> their Fourier features [B, N, d(2K+1)] (P1 Sec. 4.4).

  The coordinates are the positions (expected in [-1, 1], e.g. unit-cube
  normalised); no other features. ModelNet40: K = 64, mu = 1120 -> 387.
  """

  def __init__(self, num_freq_bands: int = 64,
               max_resolution: Union[int, Sequence[int]] = 1120,
               name: Optional[str] = None):
    super().__init__(name=name)
    preprocessors._check_positive(num_freq_bands=num_freq_bands)
    if max_resolution is None:
      raise ValueError('max_resolution is required for point clouds.')
    preprocessors._check_resolution(max_resolution, 'max_resolution')
    self._num_freq_bands = num_freq_bands
    self._max_resolution = max_resolution

  def output_shape(self, input_shape: Sequence[int]) -> tuple[int, int]:
    """(N, d(2K+1)) for per-example points of `input_shape` = (N, d)."""
    num_points, num_dims = preprocessors._check_shape(
        input_shape, 2, 'PointCloudPreprocessor input')
    if (np.ndim(self._max_resolution) != 0 and
        len(self._max_resolution) != num_dims):
      raise ValueError(
          f'max_resolution={self._max_resolution} has '
          f'{len(self._max_resolution)} entries but the points have '
          f'{num_dims} coordinates.')
    return num_points, position_encoding.num_fourier_channels(
        num_dims, self._num_freq_bands)

  def __call__(self, inputs: jax.Array, *,
               is_training: bool) -> tuple[jax.Array, None]:
    """Maps points [B, N, d] to ([B, N, d(2K+1)], None)."""
    del is_training  # Deterministic.
    preprocessors._check_float(inputs, 'PointCloudPreprocessor')
    self.output_shape(inputs.shape[1:])
    # Phases reach pi*mu/2 (~1760): computed in float32 at least, since a
    # bfloat16 phase would be off by whole periods.
    positions = inputs.astype(jnp.promote_types(inputs.dtype, jnp.float32))
    x = position_encoding.fourier_features(positions, self._num_freq_bands,
                                           self._max_resolution)
    return x.astype(inputs.dtype), None

