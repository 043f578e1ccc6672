"""Input preprocessors: raw batches -> byte array [B, M, C] (+ padding mask).

Shape letters:
  B: batch size.  M: byte array length.  C: byte array channels.
  H, W: image height, width.  T: time steps (audio samples, video frames).
  F: input channels (RGB), or spectrogram bins.  P: position channels.
  K: Fourier bands per dimension (num_freq_bands).

Every preprocessor is called as `pre(inputs, *, is_training)` and returns
(byte array [B, M, C], mask [B, M] or None); the mask is boolean, True for
real inputs. Position features are CONCATENATED to the input channels (P1
Sec. 3.2: adding them was worse). A grid's Fourier features are built once
with NumPy at trace time and enter the computation as a constant. With
`split_positions=True` (image, audio, spectrogram and video preprocessors),
a byte array with Fourier features comes back as a
`byte_array.SplitByteArray` of the [B, M, F] features and the [M, P]
position features, which the encoder can read without building [B, M, C].

Each preprocessor also has `output_shape(input_shape) -> (M, C)`, pure
Python; `compute_output_shape` calls it without a surrounding hk.transform.

Paper sizes:
  ImageNet pixels 224x224x3, K=64, mu=224:       50,176 x (3 + 258) = 261
  raw audio 61,440 samples, 128 per patch, K=64: 480 x (128 + 129) = 257
  video 32x224x224x3, 2x8x8 patches, K=16:       12,544 x (384 + 99) = 483
  point cloud N x 3, K=64, mu=1120:              N x 387
  audio+video, min_padding_size=4:               13,024 x (483 + 4) = 487
"""

import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from perceiver_jax.ops import byte_array
from perceiver_jax.modules import position_encoding

Resolution = Union[int, Sequence[int], None]
Preprocessor = Callable[..., tuple[jax.Array, Optional[jax.Array]]]

PREP_TYPES = ('pixels', 'patches', 'conv')
POSITION_ENCODING_TYPES = ('fourier', 'learned', 'none')


def make_permutation(num_positions: int, seed: int) -> np.ndarray:
  """A fixed permutation of range(num_positions), the same for a given seed.

  Args:
    num_positions: M, the byte array length.
    seed: seed of np.random.default_rng.

  Returns:
    int32 [M], a permutation of 0..M-1; `x[:, perm]` permutes a [B, M, C]
    array and `y[:, np.argsort(perm)]` undoes it.
  """
  if num_positions < 1:
    raise ValueError(f'num_positions must be >= 1, got {num_positions}.')
  rng = np.random.default_rng(seed)
  return rng.permutation(num_positions).astype(np.int32)


class PermutedPreprocessor(hk.Module):
  """Applies one fixed permutation to a preprocessor's [B, M, C] output.

  The M positions are reordered AFTER position features are attached, so
  each input keeps its own features (permuted ImageNet, P1 Sec. 4.2,
  Tab. 2). The permutation is drawn from `seed` when the input size is
  first seen (`make_permutation`), so it is the same on every host, run and
  split. Works for every preprocessor, split byte arrays included.
  """

  def __init__(self, preprocessor: Callable[..., Any], seed: int,
               name: Optional[str] = None):
    super().__init__(name=name)
    self._preprocessor = preprocessor
    self._seed = seed

  def __call__(self, inputs: Any, *, is_training: bool):
    """Returns the wrapped preprocessor's (x, mask), both permuted."""
    x, mask = self._preprocessor(inputs, is_training=is_training)
    perm = make_permutation(x.shape[1], self._seed)
    x = byte_array.take(x, perm)  # [B, M, C]
    if mask is not None:
      mask = mask[:, perm]
    return x, mask


def compute_output_shape(make_preprocessor: Callable[[], Any],
                         input_shape: Any) -> tuple[int, int]:
  """(M, C) of a preprocessor without running any array computation.

  Haiku modules can only be built inside a transform; this builds one there
  and asks its `output_shape`, which is plain Python (microseconds).

  Args:
    make_preprocessor: builds the preprocessor, e.g.
      `lambda: ImagePreprocessor(num_freq_bands=64)`.
    input_shape: per-example input shape, no batch axis (a dict of them for
      MultimodalPreprocessor).
  """
  shape_fn = hk.transform(
      lambda: make_preprocessor().output_shape(input_shape))
  return shape_fn.apply({}, None)


def _check_positive(**values: Any) -> None:
  for name, value in values.items():
    if int(value) != value or value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value!r}.')


def _check_resolution(max_resolution: Resolution, name: str) -> None:
  if max_resolution is None:
    return
  values = np.ravel(max_resolution)
  if values.size == 0 or np.any(values <= 0):
    raise ValueError(f'{name} must be positive, got {max_resolution!r}.')


def _resolve_resolution(max_resolution: Resolution,
                        grid: tuple[int, ...]) -> tuple[int, ...]:
  """max_resolution per grid dimension; None means the grid itself."""
  if max_resolution is None:
    return grid
  if np.ndim(max_resolution) == 0:
    return (int(max_resolution),) * len(grid)
  resolution = tuple(int(r) for r in max_resolution)
  if len(resolution) != len(grid):
    raise ValueError(
        f'max_resolution={resolution} has {len(resolution)} entries but the '
        f'position grid {grid} has {len(grid)} dimensions.')
  return resolution


def _check_shape(shape: Sequence[int], rank: int, what: str) -> tuple[int, ...]:
  shape = tuple(int(s) for s in shape)
  if len(shape) != rank:
    raise ValueError(f'{what} must have {rank} axes per example, got input '
                     f'shape {shape}.')
  return shape


def _check_float(inputs: jax.Array, what: str) -> None:
  # Position features would be truncated to integers otherwise.
  if not jnp.issubdtype(inputs.dtype, jnp.floating):
    raise ValueError(f'{what} expects floating-point inputs, got dtype '
                     f'{inputs.dtype}; convert (e.g. scale uint8 to [0, 1]) '
                     'in the data pipeline.')


def _patch_grid(spatial: Sequence[int], patch: Sequence[int],
                what: str) -> tuple[int, ...]:
  """Grid of non-overlapping patches; ValueError if a patch does not fit."""
  if any(s % p for s, p in zip(spatial, patch)):
    raise ValueError(f'{what}: patch shape {tuple(patch)} does not divide '
                     f'the input shape {tuple(spatial)}.')
  return tuple(s // p for s, p in zip(spatial, patch))


def extract_patches(x: jax.Array, patch_shape: Sequence[int]) -> jax.Array:
  """Cuts [B, *S, F] into non-overlapping patches [B, *S/p, prod(p) * F].

  Each patch is flattened in (p_0, ..., p_{n-1}, F) row-major order; the
  patches themselves keep the row-major order of the grid.

  Args:
    x: [B, S_0, ..., S_{n-1}, F].
    patch_shape: (p_0, ..., p_{n-1}), each dividing its S_i.
  """
  batch, *spatial, channels = x.shape
  grid = _patch_grid(spatial, patch_shape, 'extract_patches')
  n = len(grid)
  # [B, g_0, p_0, g_1, p_1, ..., F]
  x = x.reshape([batch] + [d for g, p in zip(grid, patch_shape)
                           for d in (g, p)] + [channels])
  # [B, g_0, ..., g_{n-1}, p_0, ..., p_{n-1}, F]
  perm = [0] + [1 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)]
  x = x.transpose(perm + [2 * n + 1])
  return x.reshape((batch,) + grid + (-1,))


def _concat_grid_fourier(x: jax.Array, grid: tuple[int, ...], num_bands: int,
                         max_resolution: tuple[int, ...], split: bool
                         ) -> byte_array.ByteArray:
  """[B, M, F] -> [B, M, F + d(2K+1)] with the grid's Fourier features
  (a SplitByteArray if `split`)."""
  pos = position_encoding.grid_fourier_features(grid, num_bands,
                                                max_resolution)  # [M, P]
  # Positions follow the data's dtype (e.g. a bfloat16 policy).
  x = byte_array.SplitByteArray(x, jnp.asarray(pos, x.dtype))
  return x if split else x.dense()  # [B, M, F + P]


class _GridPreprocessor(hk.Module):
  """Shared logic: data on a grid -> [B, M, F] + Fourier features of grid.

  Subclasses define `_layout(input_shape) -> (grid, F)` (shape arithmetic,
  validated) and `_features(inputs) -> [B, *grid, F]`.
  """

  def __init__(self, num_freq_bands: int, max_resolution: Resolution,
               split_positions: bool, name: Optional[str]):
    super().__init__(name=name)
    _check_positive(num_freq_bands=num_freq_bands)
    _check_resolution(max_resolution, 'max_resolution')
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
    _resolve_resolution(self._max_resolution, grid)  # Validates.
    return (math.prod(grid), channels + position_encoding.num_fourier_channels(
        len(grid), self._num_freq_bands))

  def __call__(self, inputs: jax.Array, *,
               is_training: bool) -> tuple[jax.Array, None]:
    """Maps raw inputs [B, ...] to ([B, M, F + P], None)."""
    del is_training  # Deterministic.
    _check_float(inputs, type(self).__name__)
    grid, _ = self._layout(tuple(inputs.shape[1:]))
    x = self._features(inputs)  # [B, *grid, F]
    x = x.reshape(x.shape[0], math.prod(grid), x.shape[-1])  # [B, M, F]
    x = _concat_grid_fourier(x, grid, self._num_freq_bands,
                             _resolve_resolution(self._max_resolution, grid),
                             self._split_positions)
    return x, None


class ImagePreprocessor(hk.Module):
  """Images [B, H, W, F] -> [B, M, C] (P1 ImageNet; P2 patches / conv).

  prep_type:
    'pixels'   every pixel is an input: M = H*W, F = input channels.
    'patches'  non-overlapping patch_size x patch_size patches, flattened
               in (y, x, channel) order: M = (H/p)(W/p), F = p*p*channels.
    'conv'     P2's conv preprocessing without BatchNorm: Conv 7x7 stride 2
               (SAME) to conv_channels, ReLU, max-pool 3x3 stride 2 (SAME),
               a 4x spatial downsample: M = ceil(ceil(H/2)/2) * (same for
               W), F = conv_channels (224x224 -> 56x56 x 64).
  position_encoding_type:
    'fourier'  2D Fourier features over the grid actually fed (pixels,
               patches or conv outputs), K = num_freq_bands, mu =
               max_resolution (default: that grid's shape): P = 2(2K+1).
    'learned'  a learned [M, learned_pos_channels] array
               (LearnedPositionEncoding named 'position_encoding').
    'none'     no position features (P = 0).
  `split_positions`: Fourier features come back as a SplitByteArray (module
  docstring). Permuted inputs: wrap the module in `PermutedPreprocessor`.
  """

  def __init__(self, prep_type: str = 'pixels', patch_size: int = 16,
               conv_channels: int = 64,
               position_encoding_type: str = 'fourier',
               num_freq_bands: int = 64,
               max_resolution: Resolution = None,
               learned_pos_channels: int = 128,
               learned_pos_init_scale: float = 1.0,
               split_positions: bool = False,
               name: Optional[str] = None):
    """Initialises the module; see the class docstring for the options.

    Raises:
      ValueError: for an unknown prep_type or position_encoding_type,
        non-positive sizes.
    """
    super().__init__(name=name)
    if prep_type not in PREP_TYPES:
      raise ValueError(
          f'Unknown prep_type {prep_type!r}; expected one of {PREP_TYPES}.')
    if position_encoding_type not in POSITION_ENCODING_TYPES:
      raise ValueError(
          f'Unknown position_encoding_type {position_encoding_type!r}; '
          f'expected one of {POSITION_ENCODING_TYPES}.')
    _check_positive(patch_size=patch_size, conv_channels=conv_channels,
                    num_freq_bands=num_freq_bands,
                    learned_pos_channels=learned_pos_channels)
    _check_resolution(max_resolution, 'max_resolution')
    if learned_pos_init_scale <= 0:
      raise ValueError('learned_pos_init_scale must be > 0, got '
                       f'{learned_pos_init_scale}.')
    self._prep_type = prep_type
    self._patch_size = patch_size
    self._conv_channels = conv_channels
    self._position_encoding_type = position_encoding_type
    self._num_freq_bands = num_freq_bands
    self._max_resolution = max_resolution
    self._learned_pos_channels = learned_pos_channels
    self._learned_pos_init_scale = learned_pos_init_scale
    self._split_positions = split_positions

  def _layout(self, input_shape: Sequence[int]) -> tuple[tuple[int, int],
                                                         int]:
    """(grid (h, w) fed to the encoder, channels per grid point)."""
    height, width, channels = _check_shape(input_shape, 3,
                                           'ImagePreprocessor input')
    if self._prep_type == 'pixels':
      return (height, width), channels
    if self._prep_type == 'patches':
      p = self._patch_size
      grid = _patch_grid((height, width), (p, p),
                         f'ImagePreprocessor(patch_size={p})')
      return grid, p * p * channels
    # conv: two SAME-padded stride-2 ops, each rounding up.
    grid = tuple(math.ceil(math.ceil(s / 2) / 2) for s in (height, width))
    return grid, self._conv_channels

  def _num_position_channels(self, grid: tuple[int, int]) -> int:
    if self._position_encoding_type == 'fourier':
      _resolve_resolution(self._max_resolution, grid)  # Validates.
      return position_encoding.num_fourier_channels(2, self._num_freq_bands)
    if self._position_encoding_type == 'learned':
      return self._learned_pos_channels
    return 0

  def output_shape(self, input_shape: Sequence[int]) -> tuple[int, int]:
    """(M, C) for per-example images of `input_shape` = (H, W, F)."""
    grid, channels = self._layout(input_shape)
    num_positions = math.prod(grid)
    return num_positions, channels + self._num_position_channels(grid)

  def __call__(self, inputs: jax.Array, *,
               is_training: bool) -> tuple[jax.Array, None]:
    """Maps images [B, H, W, F] to ([B, M, C] or its split form, None)."""
    del is_training  # Deterministic.
    _check_float(inputs, 'ImagePreprocessor')
    grid, _ = self._layout(inputs.shape[1:])
    num_positions = math.prod(grid)
    batch = inputs.shape[0]
    if self._prep_type == 'pixels':
      x = inputs
    elif self._prep_type == 'patches':
      p = self._patch_size
      x = extract_patches(inputs, (p, p))  # [B, H/p, W/p, p*p*F]
    else:
      x = hk.Conv2D(self._conv_channels, kernel_shape=7, stride=2,
                    padding='SAME', name='conv')(inputs)  # [B, H/2, W/2, F']
      x = jax.nn.relu(x)
      x = hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1),
                      padding='SAME')  # [B, H/4, W/4, F']
    x = x.reshape(batch, num_positions, x.shape[-1])  # [B, M, F]

    if self._position_encoding_type == 'fourier':
      x = _concat_grid_fourier(
          x, grid, self._num_freq_bands,
          _resolve_resolution(self._max_resolution, grid),
          self._split_positions)
    elif self._position_encoding_type == 'learned':
      pos = position_encoding.LearnedPositionEncoding(
          num_positions, self._learned_pos_channels,
          init_scale=self._learned_pos_init_scale,
          name='position_encoding')(batch)  # [B, M, P]
      x = jnp.concatenate([x, pos.astype(x.dtype)], axis=-1)
    return x, None


class AudioPreprocessor(_GridPreprocessor):
  """Raw audio [B, T] -> [B, T/S, S + (2K+1)]: patches + 1D Fourier features.

  P1 AudioSet: 61,440 samples in patches of S = 128 -> 480 x (128 + 129)
  with K = 64. mu = max_resolution defaults to the number of patches.
  """

  def __init__(self, samples_per_patch: int = 128, num_freq_bands: int = 64,
               max_resolution: Resolution = None,
               split_positions: bool = False, name: Optional[str] = None):
    super().__init__(num_freq_bands, max_resolution, split_positions,
                     name=name)
    _check_positive(samples_per_patch=samples_per_patch)
    self._samples_per_patch = samples_per_patch

  def _layout(self, input_shape):
    (num_samples,) = _check_shape(input_shape, 1, 'AudioPreprocessor input')
    grid = _patch_grid((num_samples,), (self._samples_per_patch,),
                       f'AudioPreprocessor(samples_per_patch='
                       f'{self._samples_per_patch})')
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
               num_freq_bands: int = 32, max_resolution: Resolution = None,
               split_positions: bool = False, name: Optional[str] = None):
    super().__init__(num_freq_bands, max_resolution, split_positions,
                     name=name)
    patch_shape = tuple(patch_shape)
    if len(patch_shape) != 2:
      raise ValueError(
          f'patch_shape must be (time, freq), got {patch_shape}.')
    _check_positive(patch_time=patch_shape[0], patch_freq=patch_shape[1])
    self._patch_shape = patch_shape

  def _layout(self, input_shape):
    shape = _check_shape(input_shape, 2, 'SpectrogramPreprocessor input')
    grid = _patch_grid(shape, self._patch_shape, 'SpectrogramPreprocessor')
    return grid, math.prod(self._patch_shape)

  def _features(self, inputs):
    return extract_patches(inputs[..., None], self._patch_shape)


class VideoPreprocessor(_GridPreprocessor):
  """Video [B, T, H, W, F] -> space-time patches + 3D Fourier features.

  patch_shape (pt, ph, pw) patches are flattened in (t, y, x, channel)
  order; Fourier features over the (t, y, x) patch grid, mu defaulting to
  that grid. P1 AudioSet: 32x224x224x3, (2, 8, 8), K = 16 -> 12,544 x
  (384 + 99) = 483 channels.
  """

  def __init__(self, patch_shape: Sequence[int] = (2, 8, 8),
               num_freq_bands: int = 16, max_resolution: Resolution = None,
               split_positions: bool = False, name: Optional[str] = None):
    super().__init__(num_freq_bands, max_resolution, split_positions,
                     name=name)
    patch_shape = tuple(patch_shape)
    if len(patch_shape) != 3:
      raise ValueError(
          f'patch_shape must be (time, height, width), got {patch_shape}.')
    _check_positive(patch_time=patch_shape[0], patch_height=patch_shape[1],
                    patch_width=patch_shape[2])
    self._patch_shape = patch_shape

  def _layout(self, input_shape):
    *spatial, channels = _check_shape(input_shape, 4,
                                      'VideoPreprocessor input')
    grid = _patch_grid(spatial, self._patch_shape, 'VideoPreprocessor')
    return grid, math.prod(self._patch_shape) * channels

  def _features(self, inputs):
    return extract_patches(inputs, self._patch_shape)


class PointCloudPreprocessor(hk.Module):
  """Points [B, N, d] -> their Fourier features [B, N, d(2K+1)] (P1 Sec. 4.4).

  The coordinates are the positions (expected in [-1, 1], e.g. unit-cube
  normalised); no other features. ModelNet40: K = 64, mu = 1120 -> 387.
  """

  def __init__(self, num_freq_bands: int = 64,
               max_resolution: Union[int, Sequence[int]] = 1120,
               name: Optional[str] = None):
    super().__init__(name=name)
    _check_positive(num_freq_bands=num_freq_bands)
    if max_resolution is None:
      raise ValueError('max_resolution is required for point clouds.')
    _check_resolution(max_resolution, 'max_resolution')
    self._num_freq_bands = num_freq_bands
    self._max_resolution = max_resolution

  def output_shape(self, input_shape: Sequence[int]) -> tuple[int, int]:
    """(N, d(2K+1)) for per-example points of `input_shape` = (N, d)."""
    num_points, num_dims = _check_shape(input_shape, 2,
                                        'PointCloudPreprocessor input')
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
    _check_float(inputs, 'PointCloudPreprocessor')
    self.output_shape(inputs.shape[1:])
    # Phases reach pi*mu/2 (~1760): computed in float32 at least, since a
    # bfloat16 phase would be off by whole periods.
    positions = inputs.astype(jnp.promote_types(inputs.dtype, jnp.float32))
    x = position_encoding.fourier_features(positions, self._num_freq_bands,
                                           self._max_resolution)
    return x.astype(inputs.dtype), None


class MultimodalPreprocessor(hk.Module):
  """Fuses several modalities into one byte array (P1 AudioSet audio+video).

  Each modality's preprocessor gives [B, M_i, C_i]. All are padded to
  C = max_i C_i + min_padding_size channels with a learned per-modality
  vector (parameter '<modality>_padding' of C - C_i channels, truncated
  normal std 0.02, broadcast over B and M_i), which also tells the encoder
  which modality an input belongs to; then they are concatenated along M in
  sorted modality order. P1 audio+video: video 483 channels +
  min_padding_size 4 -> C = 487; raw audio 257 gets 230 padding channels.

  Modality dropout (training only): per example, modality i's values (its
  preprocessor's output, position features included) are zeroed with
  probability modality_dropout[i] (P1: video, p = 0.3). The learned padding
  stays, so the encoder still sees which modality was dropped. No rescaling
  (unlike unit dropout): the model should see the values it sees at test.

  Mask: None if no modality returned one; else [B, M], the modalities'
  masks concatenated like their values, all True for a modality without one.
  """

  def __init__(self, modalities: Mapping[str, Preprocessor],
               min_padding_size: int = 2,
               modality_dropout: Optional[Mapping[str, float]] = None,
               name: Optional[str] = None):
    """Initialises the module.

    Args:
      modalities: modality name -> preprocessor (called with that entry of
        the input dict).
      min_padding_size: padding channels even the widest modality gets.
      modality_dropout: modality name -> probability in [0, 1] of zeroing
        that modality per training example.
      name: module name.

    Raises:
      ValueError: for no modalities, negative min_padding_size, or dropout
        for an unknown modality or a probability outside [0, 1].
    """
    super().__init__(name=name)
    if not modalities:
      raise ValueError('modalities must name at least one preprocessor.')
    if int(min_padding_size) != min_padding_size or min_padding_size < 0:
      raise ValueError(
          f'min_padding_size must be an integer >= 0, got {min_padding_size}.')
    modality_dropout = dict(modality_dropout or {})
    unknown = sorted(set(modality_dropout) - set(modalities))
    if unknown:
      raise ValueError(f'modality_dropout names unknown modalities {unknown}; '
                       f'modalities are {sorted(modalities)}.')
    for modality, prob in modality_dropout.items():
      if not 0.0 <= prob <= 1.0:
        raise ValueError(f'modality_dropout[{modality!r}] = {prob} is not in '
                         '[0, 1].')
    self._modalities = dict(modalities)
    self._keys = sorted(modalities)
    self._min_padding_size = int(min_padding_size)
    self._modality_dropout = modality_dropout

  def output_shape(
      self, input_shape: Mapping[str, Sequence[int]]) -> tuple[int, int]:
    """(M, C) for per-example inputs {modality: shape}."""
    self._check_keys(input_shape)
    shapes = [self._modalities[k].output_shape(input_shape[k])
              for k in self._keys]
    return (sum(m for m, _ in shapes),
            max(c for _, c in shapes) + self._min_padding_size)

  def _check_keys(self, inputs: Mapping[str, Any]) -> None:
    if not hasattr(inputs, 'keys'):
      raise ValueError('MultimodalPreprocessor expects a dict of inputs keyed '
                       f'by {self._keys}, got {type(inputs).__name__}.')
    missing = sorted(set(self._keys) - set(inputs))
    if missing:
      raise ValueError(f'Inputs lack modalities {missing}; got keys '
                       f'{sorted(inputs)}.')

  def __call__(self, inputs: Mapping[str, Any], *,
               is_training: bool) -> tuple[jax.Array, Optional[jax.Array]]:
    """Maps {modality: raw input} to ([B, M, C], mask [B, M] or None)."""
    self._check_keys(inputs)
    outputs = {k: self._modalities[k](inputs[k], is_training=is_training)
               for k in self._keys}
    batches = {k: x.shape[0] for k, (x, _) in outputs.items()}
    if len(set(batches.values())) != 1:
      raise ValueError(f'Modalities disagree on batch size: {batches}.')
    for k, (x, mask) in outputs.items():
      if x.ndim != 3 or (mask is not None and mask.shape != x.shape[:2]):
        raise ValueError(
            f'Modality {k!r} gave byte array {x.shape} and mask '
            f'{None if mask is None else mask.shape}; expected [B, M, C] '
            'and [B, M] or None.')
    width = (max(x.shape[-1] for x, _ in outputs.values()) +
             self._min_padding_size)

    values, masks = [], []
    for k in self._keys:
      x, mask = outputs[k]  # [B, M_i, C_i], [B, M_i] or None
      batch, length, channels = x.shape
      prob = self._modality_dropout.get(k, 0.0)
      if is_training and prob > 0.0:
        keep = jax.random.bernoulli(hk.next_rng_key(), 1.0 - prob, (batch,))
        x = jnp.where(keep[:, None, None], x, jnp.zeros((), x.dtype))
      if width > channels:
        padding = hk.get_parameter(
            f'{k}_padding', [width - channels],
            init=hk.initializers.TruncatedNormal(stddev=0.02))
        padding = jnp.broadcast_to(padding.astype(x.dtype),
                                   (batch, length, width - channels))
        x = jnp.concatenate([x, padding], axis=-1)  # [B, M_i, C]
      values.append(x)
      masks.append(mask)

    x = jnp.concatenate(values, axis=1)  # [B, M, C]
    if all(m is None for m in masks):
      return x, None
    mask = jnp.concatenate(
        [jnp.ones(v.shape[:2], bool) if m is None else m.astype(bool)
         for v, m in zip(values, masks)], axis=1)  # [B, M]
    return x, mask
