"""Byte arrays held in two parts: per-example channels and shared ones.

Shape letters: B batch, M byte array length, F per-example channels,
P shared channels (position features), C = F + P.

A Perceiver's byte array is mostly position features that are the same for
every example: P1 ImageNet's [B, 50,176, 261] array is 3 channels of pixels
and 258 of Fourier features of the pixel grid. `SplitByteArray` keeps the two
apart, features [B, M, F] and shared [M, P], and stands for
concat([features, broadcast(shared)]) [B, M, C] without building it; the
Fourier grid preprocessors return one when asked (`split_positions=True`,
which `models.build_model` sets). Consumers that need the whole array call
`dense(x)`. The encoder's input LayerNorm instead standardises it lazily
(`standardize`): `StandardizedByteArray` holds the statistics only, and
`ops.attend_to_inputs` lets a backend read the standardised rows without
building them.
"""

from typing import NamedTuple, Union

import jax
import jax.numpy as jnp


class SplitByteArray(NamedTuple):
  """concat([features, shared broadcast over B], axis=-1), not built.

  features: [B, M, F] per-example channels.
  shared: [M, P] channels every example has, in the dtype of features.
  """
  features: jax.Array
  shared: jax.Array

  @property
  def shape(self) -> tuple[int, int, int]:
    batch, m, f = self.features.shape
    return (batch, m, f + self.shared.shape[-1])

  @property
  def ndim(self) -> int:
    return 3

  @property
  def dtype(self):
    return self.features.dtype

  def dense(self) -> jax.Array:
    """The byte array [B, M, F + P]."""
    # Written as [x, 0] + [0, pos]: XLA:CPU builds that in one pass, where
    # concatenating with the broadcast positions first materialises the
    # broadcast (2x time).
    f = self.features.shape[-1]
    shared = jnp.pad(self.shared, ((0, 0), (f, 0)))
    features = jnp.pad(self.features,
                       ((0, 0), (0, 0), (0, self.shared.shape[-1])))
    return features + shared

  def take(self, indices) -> 'SplitByteArray':
    """The byte array with its M positions reordered (or picked) by
    `indices` [M']: [B, M', F + P]."""
    return SplitByteArray(self.features[:, indices], self.shared[indices])


class StandardizedByteArray(NamedTuple):
  """(x - mean) / std over the channels of a SplitByteArray x, not built.

  mean and inv_std are [B, M], from `standardize`.
  """
  inputs: SplitByteArray
  mean: jax.Array
  inv_std: jax.Array

  @property
  def shape(self) -> tuple[int, int, int]:
    return self.inputs.shape

  @property
  def ndim(self) -> int:
    return 3

  @property
  def dtype(self):
    return self.inputs.dtype

  def dense(self) -> jax.Array:
    """The standardised byte array [B, M, F + P]."""
    return standardized_rows(self.inputs.features, self.inputs.shared,
                             self.mean, self.inv_std)


def standardized_rows(features: jax.Array, shared: jax.Array,
                      mean: jax.Array, inv_std: jax.Array) -> jax.Array:
  """([features, shared] - mean) * inv_std: [B, M, F + P].

  Args:
    features: [B, M, F] per-example channels.
    shared: [M, P] channels every example shares.
    mean, inv_std: [B, M] row statistics.
  """
  shared = jnp.broadcast_to(shared, features.shape[:2] + shared.shape[-1:])
  rows = jnp.concatenate([features, shared], axis=-1)
  return (rows - mean[..., None]) * inv_std[..., None]


ByteArray = Union[jax.Array, SplitByteArray, StandardizedByteArray]


def dense(x: ByteArray) -> jax.Array:
  """x as one [B, M, C] array (x itself when it already is one)."""
  split = isinstance(x, (SplitByteArray, StandardizedByteArray))
  return x.dense() if split else x


def take(x: ByteArray, indices) -> ByteArray:
  """x with its M positions reordered by `indices` [M'], split or not."""
  return x.take(indices) if isinstance(x, SplitByteArray) else x[:, indices]


def standardize(x: SplitByteArray, eps: float) -> StandardizedByteArray:
  """LayerNorm's standardisation of x's rows, as statistics [B, M] only.

  The same mean and variance (over C channels, eps added to the variance)
  as of the dense rows, from the [B, M, F] features and the shared
  channels' own moments: with c_m, V_m the mean and summed squared
  deviation of shared row m and mean_bm the row's mean,
    C var_bm = sum_f (x_bmf - mean_bm)^2 + V_m + P (c_m - mean_bm)^2,
  every term a sum of squares (no cancellation).
  """
  features = x.features.astype(jnp.float32)
  shared = x.shared.astype(jnp.float32)
  p = shared.shape[-1]
  channels = features.shape[-1] + p
  shared_mean = jnp.sum(shared, axis=-1) / max(p, 1)  # [M]
  shared_ss = jnp.sum(jnp.square(shared - shared_mean[:, None]), axis=-1)
  mean = (jnp.sum(features, axis=-1) + p * shared_mean) / channels  # [B, M]
  ss = (jnp.sum(jnp.square(features - mean[..., None]), axis=-1) +
        shared_ss + p * jnp.square(shared_mean - mean))
  inv_std = jax.lax.rsqrt(ss / channels + eps)
  return StandardizedByteArray(x, mean.astype(x.dtype),
                               inv_std.astype(x.dtype))
