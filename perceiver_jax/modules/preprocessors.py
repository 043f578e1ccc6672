"""Input preprocessors: raw batches -> byte array [B, M, C] (+ padding mask).

This module holds the contract and the pieces the preprocessors share
(permutation, output shapes, validation, patches, grid Fourier features) and
ImagePreprocessor; the others live in `audio_video` (AudioPreprocessor,
SpectrogramPreprocessor, VideoPreprocessor), `point_cloud`
(PointCloudPreprocessor) and `multimodal` (MultimodalPreprocessor).

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
from typing import Any, Callable, Optional, Sequence, Union

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from perceiver_jax.ops import byte_array
from perceiver_jax.modules import position_encoding

Resolution = Union[int, Sequence[int], None]
Preprocessor = Callable[..., tuple[jax.Array, Optional[jax.Array]]]

PREP_TYPES = ('pixels', 'patches', 'conv', 'conv1x1')
POSITION_ENCODING_TYPES = ('fourier', 'learned', 'none')
CONV_NORMS = ('none', 'batch_norm')
# hk.BatchNorm of the released conv preprocessing (deepmind-research
# perceiver/io_processors.py Conv2DDownsample's defaults).
BATCH_NORM_KWARGS = dict(create_scale=True, create_offset=True,
                         decay_rate=0.9, eps=1e-5)


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
      `multimodal.MultimodalPreprocessor`).
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


class ImagePreprocessor(hk.Module):
  """Images [B, H, W, F] -> [B, M, C] (P1 ImageNet; P2 patches / conv).

  prep_type:
    'pixels'   every pixel is an input: M = H*W, F = input channels.
    'patches'  non-overlapping patch_size x patch_size patches, flattened
               in (y, x, channel) order: M = (H/p)(W/p), F = p*p*channels.
    'conv'     P2's conv preprocessing: Conv 7x7 stride 2 (SAME) to
               conv_channels, [BatchNorm,] ReLU, max-pool 3x3 stride 2
               (SAME), a 4x spatial downsample: M = ceil(ceil(H/2)/2) *
               (same for W), F = conv_channels (224x224 -> 56x56 x 64).
               conv_norm='none': the conv has a bias, no normalisation;
               'batch_norm': as released, a conv without bias, then
               hk.BatchNorm (BATCH_NORM_KWARGS; batch statistics when
               training, moving averages kept as Haiku state otherwise), so
               the model needs `models.make_forward_with_state`.
    'conv1x1'  a 1x1 conv (with bias) to conv_channels per pixel: M = H*W,
               F = conv_channels (the released learned-position model).
  position_encoding_type:
    'fourier'  2D Fourier features over the grid actually fed (pixels,
               patches or conv outputs), K = num_freq_bands, mu =
               max_resolution (default: that grid's shape): P = 2(2K+1).
    'learned'  a learned [M, learned_pos_channels] array
               (LearnedPositionEncoding named 'position_encoding'); its M
               fixes the input resolution.
    'none'     no position features (P = 0).
  project_pos_dim: if set, the position features pass through a linear map
  (hk.Linear 'position_projection') to this many channels before they are
  concatenated (P = project_pos_dim), as the released learned-position
  model does (its PositionEncodingProjector).
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
               conv_norm: str = 'none',
               project_pos_dim: Optional[int] = None,
               split_positions: bool = False,
               name: Optional[str] = None):
    """Initialises the module; see the class docstring for the options.

    Raises:
      ValueError: for an unknown prep_type, position_encoding_type or
        conv_norm, conv_norm='batch_norm' without prep_type='conv',
        project_pos_dim without position features, non-positive sizes.
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
    if conv_norm not in CONV_NORMS:
      raise ValueError(
          f'Unknown conv_norm {conv_norm!r}; expected one of {CONV_NORMS}.')
    if conv_norm != 'none' and prep_type != 'conv':
      raise ValueError(f'conv_norm={conv_norm!r} needs prep_type=\'conv\', '
                       f'got prep_type={prep_type!r}.')
    if project_pos_dim is not None:
      _check_positive(project_pos_dim=project_pos_dim)
      if position_encoding_type == 'none':
        raise ValueError(f'project_pos_dim={project_pos_dim} needs position '
                         "features; position_encoding_type is 'none'.")
    self._prep_type = prep_type
    self._patch_size = patch_size
    self._conv_channels = conv_channels
    self._position_encoding_type = position_encoding_type
    self._num_freq_bands = num_freq_bands
    self._max_resolution = max_resolution
    self._learned_pos_channels = learned_pos_channels
    self._learned_pos_init_scale = learned_pos_init_scale
    self._conv_norm = conv_norm
    self._project_pos_dim = project_pos_dim
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
    if self._prep_type == 'conv1x1':
      return (height, width), self._conv_channels
    # conv: two SAME-padded stride-2 ops, each rounding up.
    grid = tuple(math.ceil(math.ceil(s / 2) / 2) for s in (height, width))
    return grid, self._conv_channels

  def _num_position_channels(self, grid: tuple[int, int]) -> int:
    if self._project_pos_dim is not None:
      return self._project_pos_dim
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
    _check_float(inputs, 'ImagePreprocessor')
    grid, _ = self._layout(inputs.shape[1:])
    num_positions = math.prod(grid)
    batch = inputs.shape[0]
    if self._prep_type == 'pixels':
      x = inputs
    elif self._prep_type == 'patches':
      p = self._patch_size
      x = extract_patches(inputs, (p, p))  # [B, H/p, W/p, p*p*F]
    elif self._prep_type == 'conv1x1':
      x = hk.Conv2D(self._conv_channels, kernel_shape=1,
                    name='conv1x1')(inputs)  # [B, H, W, F']
    else:
      batch_norm = self._conv_norm == 'batch_norm'
      x = hk.Conv2D(self._conv_channels, kernel_shape=7, stride=2,
                    padding='SAME', with_bias=not batch_norm,
                    name='conv')(inputs)  # [B, H/2, W/2, F']
      if batch_norm:
        x = hk.BatchNorm(name='batchnorm', **BATCH_NORM_KWARGS)(
            x, is_training=is_training)
      x = jax.nn.relu(x)
      x = hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1),
                      padding='SAME')  # [B, H/4, W/4, F']
    x = x.reshape(batch, num_positions, x.shape[-1])  # [B, M, F]

    if self._position_encoding_type == 'fourier':
      pos = position_encoding.grid_fourier_features(
          grid, self._num_freq_bands,
          _resolve_resolution(self._max_resolution, grid))  # [M, P]
    elif self._position_encoding_type == 'learned':
      # [M, P]: broadcast over the batch by the concatenation below.
      pos = position_encoding.LearnedPositionEncoding(
          num_positions, self._learned_pos_channels,
          init_scale=self._learned_pos_init_scale,
          name='position_encoding')(1)[0]
    else:
      return x, None
    if self._project_pos_dim is not None:
      pos = hk.Linear(self._project_pos_dim, name='position_projection')(
          jnp.asarray(pos, x.dtype))  # [M, P']
    # Positions follow the data's dtype (e.g. a bfloat16 policy).
    x = byte_array.SplitByteArray(x, jnp.asarray(pos, x.dtype))
    if self._split_positions and self._position_encoding_type == 'fourier':
      return x, None
    return x.dense(), None  # [B, M, F + P]
