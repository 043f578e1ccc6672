"""Audio, spectrogram and video preprocessors: patches + grid Fourier features.

Each cuts its input into non-overlapping patches on a 1D, 2D or 3D grid and
concatenates the grid's Fourier features (the contract, shape letters and
`split_positions` are in `preprocessors`).
"""

import math
from typing import Optional, Sequence

import haiku as hk
import jax

from perceiver_jax.modules import position_encoding
from perceiver_jax.modules import preprocessors

# The preprocessors module's private helpers (validation, grids) serve
# every preprocessor module.
# pylint: disable=protected-access


class _GridPreprocessor(hk.Module):
  """Shared logic: data on a grid -> [B, M, F] + Fourier features of grid.

  Subclasses define `_layout(input_shape) -> (grid, F)` (shape arithmetic,
  validated) and `_features(inputs) -> [B, *grid, F]`.
  """

  def __init__(self, num_freq_bands: int,
               max_resolution: preprocessors.Resolution,
               split_positions: bool, name: Optional[str]):
    super().__init__(name=name)
    preprocessors._check_positive(num_freq_bands=num_freq_bands)
    preprocessors._check_resolution(max_resolution, 'max_resolution')
    self._num_freq_bands = num_freq_bands
    self._max_resolution = max_resolution
    self._split_positions = split_positions

  def _layout(self, input_shape: tuple[int, ...]) -> tuple[tuple[int, ...],
                                                           int]:
    raise NotImplementedError

  def _features(self, inputs: jax.Array) -> jax.Array:
    raise NotImplementedError

  def output_shape(self, input_shape: Sequence[int]) -> tuple[int, int]:
    """(M, C) for per-example inputs of `input_shape` (no batch axis)."""
    grid, channels = self._layout(tuple(input_shape))
    preprocessors._resolve_resolution(self._max_resolution,
                                      grid)  # Validates.
    return (math.prod(grid), channels + position_encoding.num_fourier_channels(
        len(grid), self._num_freq_bands))

  def __call__(self, inputs: jax.Array, *,
               is_training: bool) -> tuple[jax.Array, None]:
    """Maps raw inputs [B, ...] to ([B, M, F + P], None)."""
    del is_training  # Deterministic.
    preprocessors._check_float(inputs, type(self).__name__)
    grid, _ = self._layout(tuple(inputs.shape[1:]))
    x = self._features(inputs)  # [B, *grid, F]
    x = x.reshape(x.shape[0], math.prod(grid), x.shape[-1])  # [B, M, F]
    x = preprocessors._concat_grid_fourier(
        x, grid, self._num_freq_bands,
        preprocessors._resolve_resolution(self._max_resolution, grid),
        self._split_positions)
    return x, None


class AudioPreprocessor(_GridPreprocessor):
  """Raw audio [B, T] -> [B, T/S, S + (2K+1)]: patches + 1D Fourier features.

  P1 AudioSet: 61,440 samples in patches of S = 128 -> 480 x (128 + 129)
  with K = 64. mu = max_resolution defaults to the number of patches.
  """

  def __init__(self, samples_per_patch: int = 128, num_freq_bands: int = 64,
               max_resolution: preprocessors.Resolution = None,
               split_positions: bool = False, name: Optional[str] = None):
    super().__init__(num_freq_bands, max_resolution, split_positions,
                     name=name)
    preprocessors._check_positive(samples_per_patch=samples_per_patch)
    self._samples_per_patch = samples_per_patch

  def _layout(self, input_shape):
    (num_samples,) = preprocessors._check_shape(input_shape, 1,
                                                'AudioPreprocessor input')
    grid = preprocessors._patch_grid(
        (num_samples,), (self._samples_per_patch,),
        f'AudioPreprocessor(samples_per_patch={self._samples_per_patch})')
    return grid, self._samples_per_patch

  def _features(self, inputs):
    return inputs.reshape(inputs.shape[0], -1,
                          self._samples_per_patch)  # [B, T/S, S]


class SpectrogramPreprocessor(_GridPreprocessor):
  """Spectrograms [B, frames, bins] -> patches + 2D Fourier features.

  Patches of patch_shape = (pt, pf) over (time, frequency) give
  M = (frames/pt)(bins/pf) inputs of pt*pf values (time-major), plus
  2(2K+1) Fourier channels over the (time, frequency) grid of patches.
  P1's mel input: 96 x 50 with (1, 1) -> 4,800 inputs.
  """

  def __init__(self, patch_shape: Sequence[int] = (1, 1),
               num_freq_bands: int = 32,
               max_resolution: preprocessors.Resolution = None,
               split_positions: bool = False, name: Optional[str] = None):
    super().__init__(num_freq_bands, max_resolution, split_positions,
                     name=name)
    patch_shape = tuple(patch_shape)
    if len(patch_shape) != 2:
      raise ValueError(
          f'patch_shape must be (time, freq), got {patch_shape}.')
    preprocessors._check_positive(patch_time=patch_shape[0],
                                  patch_freq=patch_shape[1])
    self._patch_shape = patch_shape

  def _layout(self, input_shape):
    shape = preprocessors._check_shape(input_shape, 2,
                                       'SpectrogramPreprocessor input')
    grid = preprocessors._patch_grid(shape, self._patch_shape,
                                     'SpectrogramPreprocessor')
    return grid, math.prod(self._patch_shape)

  def _features(self, inputs):
    return preprocessors.extract_patches(inputs[..., None], self._patch_shape)


class VideoPreprocessor(_GridPreprocessor):
  """Video [B, T, H, W, F] -> space-time patches + 3D Fourier features.

  patch_shape (pt, ph, pw) patches are flattened in (t, y, x, channel)
  order; Fourier features over the (t, y, x) patch grid, mu defaulting to
  that grid. P1 AudioSet: 32x224x224x3, (2, 8, 8), K = 16 -> 12,544 x
  (384 + 99) = 483 channels.
  """

  def __init__(self, patch_shape: Sequence[int] = (2, 8, 8),
               num_freq_bands: int = 16,
               max_resolution: preprocessors.Resolution = None,
               split_positions: bool = False, name: Optional[str] = None):
    super().__init__(num_freq_bands, max_resolution, split_positions,
                     name=name)
    patch_shape = tuple(patch_shape)
    if len(patch_shape) != 3:
      raise ValueError(
          f'patch_shape must be (time, height, width), got {patch_shape}.')
    preprocessors._check_positive(patch_time=patch_shape[0],
                                  patch_height=patch_shape[1],
                                  patch_width=patch_shape[2])
    self._patch_shape = patch_shape

  def _layout(self, input_shape):
    *spatial, channels = preprocessors._check_shape(input_shape, 4,
                                                    'VideoPreprocessor input')
    grid = preprocessors._patch_grid(spatial, self._patch_shape,
                                     'VideoPreprocessor')
    return grid, math.prod(self._patch_shape) * channels

  def _features(self, inputs):
    return preprocessors.extract_patches(inputs, self._patch_shape)
