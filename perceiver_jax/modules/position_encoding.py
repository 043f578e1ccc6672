"""Position encodings: Fourier features (P1 Sec. 3.2, App. D) and learned.

Shape letters:
  B: batch size.  M: number of positions (prod of the index dims).
  d: number of index dimensions (2 for images, 3 for video and points).
  K: number of frequency bands per dimension.

The pure functions accept NumPy or JAX arrays. Given NumPy they return NumPy,
so a preprocessor whose positions are a fixed grid builds its features once,
as a trace-time constant, instead of recomputing sines every step.
"""

import functools
from typing import Optional, Sequence, Union

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

Array = Union[np.ndarray, jax.Array]


def build_linear_positions(
    index_dims: Sequence[int],
    output_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
  """The grid of positions of an array of shape `index_dims`.

  Along each dimension of size n the coordinates are
  linspace(output_range[0], output_range[1], n), so the first and last
  elements sit exactly at the ends of the range.

  Args:
    index_dims: the grid shape, e.g. (H, W).
    output_range: (low, high) of every coordinate.

  Returns:
    float32 [*index_dims, d] with d = len(index_dims); entry [i, j, ..., k]
    is the coordinate of element (i, j, ..., k), dimension 0 first.

  Raises:
    ValueError: if index_dims is empty or holds a size < 1.
  """
  index_dims = tuple(int(n) for n in index_dims)
  if not index_dims or min(index_dims) < 1:
    raise ValueError(
        f'index_dims must be non-empty positive sizes, got {index_dims}.')
  low, high = output_range
  axes = [np.linspace(low, high, n, dtype=np.float64) for n in index_dims]
  grid = np.stack(np.meshgrid(*axes, indexing='ij'), axis=-1)
  return grid.astype(np.float32)


def _check_max_resolution(max_resolution: Union[int, Sequence[int]],
                          num_dims: int) -> tuple[int, ...]:
  """Broadcasts an int to every dimension; validates a sequence's length."""
  if np.ndim(max_resolution) == 0:
    max_resolution = (max_resolution,) * num_dims
  max_resolution = tuple(max_resolution)
  if len(max_resolution) != num_dims:
    raise ValueError(
        f'max_resolution={max_resolution} has {len(max_resolution)} entries '
        f'but the positions have {num_dims} dimensions.')
  if min(max_resolution) <= 0:
    raise ValueError(f'max_resolution must be positive, got {max_resolution}.')
  return max_resolution


def fourier_features(positions: Array, num_bands: int,
                     max_resolution: Union[int, Sequence[int]],
                     concat_pos: bool = True,
                     sine_only: bool = False) -> Array:
  """Fourier features of positions (P1 Sec. 3.2).

  For dimension d with max resolution mu_d the K frequencies are
  f_k = linspace(1, mu_d / 2, K) (the Nyquist frequency of a grid of mu_d
  samples over [-1, 1]); each coordinate x_d yields sin(pi f_k x_d) and
  cos(pi f_k x_d).

  Channel order (stable; checkpoints and tests depend on it):
    [x_0 .. x_{d-1}]                                  raw positions, d
    [sin(pi f_0 x_0) .. sin(pi f_{K-1} x_0),
     sin(pi f_0 x_1) .. ..., sin(pi f_{K-1} x_{d-1})] all sines, d*K,
                                                      dimension-major
    [cos(...) in the same order as the sines]         all cosines, d*K
  so output channel d + i*K + k is sin(pi f_k x_i).

  Args:
    positions: [..., d] coordinates, usually in [-1, 1]. NumPy in gives
      NumPy out (computed in float64, returned in the input's float dtype,
      float32 for integer input); a JAX array gives a JAX array.
    num_bands: K >= 1, frequency bands per dimension.
    max_resolution: mu, an int for every dimension or one per dimension.
    concat_pos: prepend the raw positions.
    sine_only: omit the cosines.

  Returns:
    [..., C] with C = d * (2K + 1), or d * (K + 1) if sine_only, each minus
    d if not concat_pos.

  Raises:
    ValueError: for num_bands < 1, positions without a trailing dimension,
      or a max_resolution that does not match d.
  """
  if num_bands < 1:
    raise ValueError(f'num_bands must be >= 1, got {num_bands}.')
  use_numpy = not isinstance(positions, jax.Array)
  if use_numpy:
    positions = np.asarray(positions)
    out_dtype = (positions.dtype if np.issubdtype(positions.dtype, np.floating)
                 else np.dtype(np.float32))
    positions = positions.astype(np.float64)
    xp = np
  else:
    xp = jnp
  if positions.ndim < 1:
    raise ValueError(
        f'positions must be [..., d], got shape {positions.shape}.')
  num_dims = positions.shape[-1]
  max_resolution = _check_max_resolution(max_resolution, num_dims)
  # [d, K]: each dimension's frequencies.
  freqs = np.stack([np.linspace(1.0, mu / 2.0, num_bands)
                    for mu in max_resolution])
  if not use_numpy:
    freqs = freqs.astype(positions.dtype)
  # [..., d, K] -> [..., d*K], dimension-major.
  angles = np.pi * positions[..., :, None] * freqs
  angles = angles.reshape(positions.shape[:-1] + (num_dims * num_bands,))
  features = [xp.sin(angles)]
  if not sine_only:
    features.append(xp.cos(angles))
  if concat_pos:
    features.insert(0, positions)
  out = xp.concatenate(features, axis=-1)
  if use_numpy:
    out = out.astype(out_dtype)
  return out


def num_fourier_channels(num_dims: int, num_bands: int,
                         concat_pos: bool = True,
                         sine_only: bool = False) -> int:
  """Channels `fourier_features` produces for d-dimensional positions."""
  per_dim = num_bands * (1 if sine_only else 2) + (1 if concat_pos else 0)
  return num_dims * per_dim


@functools.lru_cache(maxsize=32)
def grid_fourier_features(index_dims: tuple[int, ...], num_bands: int,
                          max_resolution: tuple[int, ...]) -> np.ndarray:
  """Fourier features of the linear grid over `index_dims`, flattened.

  Cached (read-only) because preprocessors are traced several times (init,
  apply, eval_shape) and the ImageNet grid takes ~0.1 s to build.

  Args:
    index_dims: the grid shape (hashable tuple).
    num_bands: K.
    max_resolution: mu per dimension (hashable tuple).

  Returns:
    float32 [M, d(2K+1)] with M = prod(index_dims), positions in row-major
    (C) order of the grid, channels as in `fourier_features`.
  """
  positions = build_linear_positions(index_dims)
  features = fourier_features(
      positions.reshape(-1, len(index_dims)), num_bands, max_resolution)
  features.flags.writeable = False
  return features


class LearnedPositionEncoding(hk.Module):
  """One learned vector per position, shared across the batch."""

  def __init__(self, index_dim: int, num_channels: int,
               init_scale: float = 0.02, name: Optional[str] = None):
    """Initialises the module.

    Args:
      index_dim: M, the number of positions.
      num_channels: channels of each position's vector.
      init_scale: stddev of the truncated normal initialiser (truncated at
        +-2 stddev, as the latent array; the empirical std is thus
        ~0.88 * init_scale).
      name: module name.

    Raises:
      ValueError: for non-positive sizes or init_scale.
    """
    super().__init__(name=name)
    if index_dim < 1 or num_channels < 1:
      raise ValueError('index_dim and num_channels must be >= 1, got '
                       f'index_dim={index_dim}, num_channels={num_channels}.')
    if init_scale <= 0:
      raise ValueError(f'init_scale must be > 0, got {init_scale}.')
    self._index_dim = index_dim
    self._num_channels = num_channels
    self._init_scale = init_scale

  def __call__(self, batch_size: int) -> jax.Array:
    """Returns the encodings broadcast to [B, M, num_channels]."""
    pos_embs = hk.get_parameter(
        'pos_embs', [self._index_dim, self._num_channels],
        init=hk.initializers.TruncatedNormal(stddev=self._init_scale))
    return jnp.broadcast_to(pos_embs, (batch_size,) + pos_embs.shape)
