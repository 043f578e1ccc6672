"""The baselines P1 compares the Perceiver with (Tab. 1, 2 and 4).

Shape letters:
  B: batch size.  H, W: image grid (for point clouds, one the config sets).
  M = H * W: byte array length.
  C: byte array channels (pixels, + Fourier features for the (FF) rows).
  P: patches.  D: Transformer width.  K: number of classes.

Every baseline reads the byte array [B, M, C] that the Perceiver's
preprocessor makes (pixels with their Fourier features attached, then, for
permuted ImageNet, one fixed permutation of the M positions; P1 Sec. 4.2).
The convolutional and patch models reshape it back to the [B, H, W, C] grid
they need: a permutation scrambles that grid, which is what P1 Tab. 2
measures. The Transformer reads the M positions as a set, as the Perceiver
does, so a permutation does not change what it computes.

  ResNet      Haiku's `hk.nets.ResNet` on the grid; ResNet50 is ResNet-50
              (25.56M parameters at 3 channels and 1,000 classes). Its
              BatchNorm has state.
  ViT         ViT (Dosovitskiy et al. 2021): non-overlapping patches, a
              linear patch embedding, a class token, learned position
              embeddings, pre-LN Transformer blocks, a final LayerNorm and a
              linear head on the class token. ViT-B/16 at 224x224, 3
              channels, 1,000 classes: 86.57M parameters.
  Transformer a pre-LN Transformer over the M positions (P1 Tab. 1: 64x64
              pixels with Fourier features, M = 4,096): a linear input
              projection to D, the blocks, a final LayerNorm, the average
              over positions and a linear head.

`Baseline` puts a preprocessor (that of the Perceiver: the same byte array,
the same permutation) in front of one of these networks; it is the model
`perceiver_jax.models.build_model` returns for a baseline config, and the
class a mixed-precision policy is keyed on (training/precision.py).
"""

from typing import Any, Callable, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from perceiver_jax.modules import attention
from perceiver_jax.modules import preprocessors
from perceiver_jax.ops import byte_array


def _to_grid(inputs: jax.Array, grid: Sequence[int]) -> jax.Array:
  """[B, M, C] -> [B, *grid, C], row-major as the preprocessor flattened."""
  if inputs.ndim != 3:
    raise ValueError(f'inputs must be [B, M, C], got shape {inputs.shape}.')
  grid = tuple(grid)
  size = 1
  for g in grid:
    size *= g
  if inputs.shape[1] != size:
    raise ValueError(f'inputs have M={inputs.shape[1]} positions; the grid '
                     f'{grid} has {size}.')
  return inputs.reshape((inputs.shape[0],) + grid + (inputs.shape[-1],))


def _check_positive(**values: int) -> None:
  bad = {k: v for k, v in values.items() if v < 1}
  if bad:
    raise ValueError(f'Expected positive values, got {bad}.')


class ResNet(hk.Module):
  """`hk.nets.ResNet` on the byte array reshaped to its grid.

  The stem (initial conv, BatchNorm, ReLU, 3x3/2 max-pool) and the four
  block groups are Haiku's; the `initial_conv_*` sizes and `strides` let
  small images (8x8 digits) keep some spatial extent.
  Defaults: ResNet-50.

  `zero_init_logits`: Haiku initialises the logits layer's weights to zero
  (the default here). Under LAMB that layer hardly trains: the trust ratio
  scales each update to lr x the weight's norm, so a weight starting at zero
  grows by at most a factor (1 + lr) per step after its first update. False
  initialises it as every other Linear of the project (`linear_init`).
  """

  def __init__(self, num_classes: int, grid: Sequence[int],
               blocks_per_group: Sequence[int] = (3, 4, 6, 3),
               channels_per_group: Sequence[int] = (256, 512, 1024, 2048),
               bottleneck: bool = True, initial_conv_channels: int = 64,
               initial_conv_kernel_shape: int = 7,
               initial_conv_stride: int = 2,
               strides: Sequence[int] = (1, 2, 2, 2),
               zero_init_logits: bool = True,
               name: Optional[str] = None):
    """Initialises the module.

    Raises:
      ValueError: non-positive sizes, or group settings not of length 4.
    """
    super().__init__(name=name)
    _check_positive(num_classes=num_classes,
                    initial_conv_channels=initial_conv_channels,
                    initial_conv_kernel_shape=initial_conv_kernel_shape,
                    initial_conv_stride=initial_conv_stride)
    for what, values in (('blocks_per_group', blocks_per_group),
                         ('channels_per_group', channels_per_group),
                         ('strides', strides)):
      if len(values) != 4 or min(values) < 1:
        raise ValueError(f'{what} must be 4 positive integers (one per '
                         f'block group), got {tuple(values)}.')
    self._grid = tuple(grid)
    self._net = hk.nets.ResNet(
        blocks_per_group=tuple(blocks_per_group), num_classes=num_classes,
        bottleneck=bottleneck, channels_per_group=tuple(channels_per_group),
        initial_conv_config=dict(output_channels=initial_conv_channels,
                                 kernel_shape=initial_conv_kernel_shape,
                                 stride=initial_conv_stride),
        strides=tuple(strides),
        logits_config=None if zero_init_logits else dict(
            w_init=attention.linear_init()),
        name='resnet')

  def __call__(self, inputs: jax.Array, *, is_training: bool) -> jax.Array:
    """[B, M, C] -> logits [B, K]."""
    return self._net(_to_grid(inputs, self._grid), is_training=is_training)


class ResNet50(ResNet):
  """ResNet-50 (He et al. 2016) on the byte array's grid: 25,557,032
  parameters at 3 channels and 1,000 classes."""

  def __init__(self, num_classes: int, grid: Sequence[int],
               name: Optional[str] = None):
    super().__init__(num_classes, grid, name=name)


class Transformer(hk.Module):
  """Pre-LN Transformer blocks over a set of D-wide tokens."""

  def __init__(self, num_layers: int, num_heads: int, widening_factor: int,
               dropout_prob: float = 0.0, name: Optional[str] = None):
    super().__init__(name=name)
    _check_positive(num_layers=num_layers, num_heads=num_heads,
                    widening_factor=widening_factor)
    self._blocks = [
        attention.SelfAttention(num_heads=num_heads,
                                widening_factor=widening_factor,
                                dropout_prob=dropout_prob, name=f'block_{i}')
        for i in range(num_layers)]
    self._norm = attention.layer_norm('final_norm')

  def __call__(self, x: jax.Array, *, is_training: bool) -> jax.Array:
    """[B, T, D] -> [B, T, D]."""
    for block in self._blocks:
      x = block(x, is_training=is_training)
    return self._norm(x)


class ViT(hk.Module):
  """Vision Transformer on non-overlapping patches of the grid."""

  def __init__(self, num_classes: int, grid: Sequence[int], patch_size: int,
               hidden_size: int = 768, num_layers: int = 12,
               num_heads: int = 12, widening_factor: int = 4,
               dropout_prob: float = 0.0, name: Optional[str] = None):
    """Initialises the module (defaults: ViT-B).

    Raises:
      ValueError: non-positive sizes, a patch that does not divide the grid,
        or hidden_size not divisible by num_heads.
    """
    super().__init__(name=name)
    _check_positive(num_classes=num_classes, patch_size=patch_size,
                    hidden_size=hidden_size)
    self._grid = tuple(grid)
    if any(g % patch_size for g in self._grid):
      raise ValueError(f'patch_size={patch_size} does not divide the grid '
                       f'{self._grid}.')
    if hidden_size % num_heads:
      raise ValueError(f'hidden_size={hidden_size} is not divisible by '
                       f'num_heads={num_heads}.')
    self._num_classes = num_classes
    self._patch_size = patch_size
    self._hidden_size = hidden_size
    self._num_patches = 1
    for g in self._grid:
      self._num_patches *= g // patch_size
    self._transformer = Transformer(num_layers, num_heads, widening_factor,
                                    dropout_prob, name='transformer')

  def __call__(self, inputs: jax.Array, *, is_training: bool) -> jax.Array:
    """[B, M, C] -> logits [B, K]."""
    x = _to_grid(inputs, self._grid)  # [B, H, W, C]
    x = preprocessors.extract_patches(
        x, (self._patch_size,) * len(self._grid))  # [B, H/p, W/p, p*p*C]
    batch = x.shape[0]
    x = x.reshape(batch, self._num_patches, -1)  # [B, P, p*p*C]
    x = attention.Dense(name='patch_embedding')(x, self._hidden_size)
    cls = hk.get_parameter('cls_token', [1, 1, self._hidden_size], x.dtype,
                           init=jnp.zeros)
    x = jnp.concatenate(
        [jnp.broadcast_to(cls, (batch, 1, self._hidden_size)), x],
        axis=1)  # [B, 1 + P, D]
    pos = hk.get_parameter(
        'pos_embs', [1 + self._num_patches, self._hidden_size], x.dtype,
        init=hk.initializers.TruncatedNormal(0.02))
    x = self._transformer(x + pos, is_training=is_training)  # [B, 1 + P, D]
    return attention.Dense(name='head')(x[:, 0], self._num_classes)


class PixelTransformer(hk.Module):
  """A Transformer over the M positions of the byte array, as a set."""

  def __init__(self, num_classes: int, hidden_size: int = 512,
               num_layers: int = 6, num_heads: int = 8,
               widening_factor: int = 1, dropout_prob: float = 0.0,
               name: Optional[str] = None):
    super().__init__(name=name)
    _check_positive(num_classes=num_classes, hidden_size=hidden_size)
    if hidden_size % num_heads:
      raise ValueError(f'hidden_size={hidden_size} is not divisible by '
                       f'num_heads={num_heads}.')
    self._num_classes = num_classes
    self._hidden_size = hidden_size
    self._transformer = Transformer(num_layers, num_heads, widening_factor,
                                    dropout_prob, name='transformer')

  def __call__(self, inputs: jax.Array, *, is_training: bool) -> jax.Array:
    """[B, M, C] -> logits [B, K]."""
    if inputs.ndim != 3:
      raise ValueError(f'inputs must be [B, M, C], got shape {inputs.shape}.')
    x = attention.Dense(name='input_projection')(inputs, self._hidden_size)
    x = self._transformer(x, is_training=is_training)  # [B, M, D]
    return attention.Dense(name='head')(jnp.mean(x, axis=1),
                                        self._num_classes)


class Baseline(hk.Module):
  """A preprocessor, then a baseline network: inputs [B, *grid, F] -> [B, K].

  The preprocessor is the Perceiver's (pixels, Fourier features, and for
  permuted ImageNet the fixed permutation after them), so a baseline sees
  the very byte array [B, M, C] a Perceiver would. The network is made by
  `make_network(grid)` once the grid is known: the conv and patch models
  reshape the byte array to it. The grid is the input's (H, W) for images;
  `grid` sets one for inputs without their own (point clouds [B, N, 3]:
  N = the product of `grid`, placed row-major in input order).
  """

  def __init__(self, preprocessor: Callable[..., Any],
               make_network: Callable[[tuple[int, ...]], Callable[..., Any]],
               grid: Optional[Sequence[int]] = None,
               name: Optional[str] = None):
    super().__init__(name=name)
    self._preprocessor = preprocessor
    self._make_network = make_network
    self._grid = None if grid is None else tuple(grid)

  def __call__(self, inputs: jax.Array, *, is_training: bool) -> jax.Array:
    """Inputs [B, *input_grid, F] -> logits [B, K]."""
    grid = self._grid or tuple(inputs.shape[1:-1])
    x, mask = self._preprocessor(inputs, is_training=is_training)
    if mask is not None:
      raise ValueError('The baselines take unpadded grids; the preprocessor '
                       'returned a padding mask.')
    x = byte_array.dense(x)  # [B, M, C]
    return self._make_network(grid)(x, is_training=is_training)  # [B, K]
