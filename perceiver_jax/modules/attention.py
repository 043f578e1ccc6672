"""Attention and MLP blocks of the Perceiver (P1 App. C).

Shape letters:
  B: batch size.           N: number of queries (latents or output queries).
  M: number of keys/values (byte array length, or latents in self-attention).
  H: number of heads.      D: query (latent) channels.  C: key/value channels.
  K: qk channels per head. V: v channels per head.

Every block calls `dot_product_attention`, the one place that computes
softmax(q k^T / sqrt(K)) v, so it can be swapped for a fused kernel.
"""

import math
from typing import Optional

import haiku as hk
import jax
import jax.numpy as jnp


def linear_init() -> hk.initializers.Initializer:
  """Variance scaling 1.0, fan-in, truncated normal (P1 App. C)."""
  return hk.initializers.VarianceScaling(1.0, 'fan_in', 'truncated_normal')


def layer_norm(name: str) -> hk.LayerNorm:
  return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True,
                      eps=1e-5, name=name)


def _check_mask(mask: jax.Array, batch: int, n: int, m: int) -> jax.Array:
  """Returns a boolean mask broadcastable to [B, H, N, M]."""
  if mask.ndim == 2:  # [B, M]: which keys are real.
    mask = mask[:, None, None, :]
  elif mask.ndim == 3:  # [B, N, M]
    mask = mask[:, None, :, :]
  else:
    raise ValueError(
        f'mask must be [B, M] or [B, N, M], got shape {mask.shape}.')
  if (mask.shape[0] not in (1, batch) or mask.shape[2] not in (1, n) or
      mask.shape[3] != m):
    raise ValueError(
        f'mask of shape {mask.shape} does not match B={batch}, N={n}, M={m}.')
  return mask.astype(bool)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: Optional[jax.Array] = None) -> jax.Array:
  """Multi-head scaled dot-product attention.

  Logits are scaled by 1/sqrt(K) and normalised in float32 whatever the
  compute dtype. Queries whose keys are all masked attend to nothing and
  return zeros.

  Args:
    q: [B, N, H, K] queries.
    k: [B, M, H, K] keys.
    v: [B, M, H, V] values.
    mask: optional boolean [B, M] (True = real key) or [B, N, M].

  Returns:
    [B, N, H, V] attended values, in the dtype of v.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError('q, k, v must be [B, N|M, H, K|V]; got shapes '
                     f'{q.shape}, {k.shape}, {v.shape}.')
  batch, n, heads, qk = q.shape
  m = k.shape[1]
  if k.shape[2:] != (heads, qk) or v.shape[1:3] != (m, heads):
    raise ValueError(f'Incompatible q {q.shape}, k {k.shape}, v {v.shape}.')
  logits = jnp.einsum('bnhk,bmhk->bhnm', q, k)  # [B, H, N, M]
  logits = logits.astype(jnp.float32) * (1.0 / math.sqrt(qk))
  if mask is not None:
    mask = _check_mask(mask, batch, n, m)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    # A row with no real key would otherwise spread weight uniformly.
    weights = jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights, 0.0)
  return jnp.einsum('bhnm,bmhv->bnhv', weights.astype(v.dtype), v)


class MLP(hk.Module):
  """Linear -> GELU -> Linear, keeping the channel count (P1 App. C)."""

  def __init__(self, widening_factor: int = 1, dropout_prob: float = 0.0,
               name: Optional[str] = None):
    super().__init__(name=name)
    if widening_factor < 1:
      raise ValueError(f'widening_factor must be >= 1, got {widening_factor}.')
    self._widening_factor = widening_factor
    self._dropout_prob = dropout_prob

  def __call__(self, x: jax.Array, *, is_training: bool) -> jax.Array:
    """Maps [..., C] -> [..., C]."""
    channels = x.shape[-1]
    x = hk.Linear(self._widening_factor * channels, w_init=linear_init(),
                  name='hidden')(x)
    x = jax.nn.gelu(x)
    x = hk.Linear(channels, w_init=linear_init(), name='output')(x)
    return _dropout(x, self._dropout_prob, is_training)


class Attention(hk.Module):
  """Multi-head attention with q, k, v and output projections (all biased).

  qk_channels defaults to the key/value input width (P1: 261 on ImageNet),
  v_channels to qk_channels and output_channels to the query width.
  """

  def __init__(self, num_heads: int = 8, qk_channels: Optional[int] = None,
               v_channels: Optional[int] = None,
               output_channels: Optional[int] = None,
               dropout_prob: float = 0.0, name: Optional[str] = None):
    super().__init__(name=name)
    if num_heads < 1:
      raise ValueError(f'num_heads must be >= 1, got {num_heads}.')
    self._num_heads = num_heads
    self._qk_channels = qk_channels
    self._v_channels = v_channels
    self._output_channels = output_channels
    self._dropout_prob = dropout_prob

  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array, *,
               is_training: bool, mask: Optional[jax.Array] = None
               ) -> jax.Array:
    """Attends from [B, N, D] queries to [B, M, C] keys/values -> [B, N, D']."""
    qk_channels = self._qk_channels or inputs_kv.shape[-1]
    v_channels = self._v_channels or qk_channels
    output_channels = self._output_channels or inputs_q.shape[-1]
    h = self._num_heads
    for what, width in (('qk_channels', qk_channels),
                        ('v_channels', v_channels)):
      if width % h:
        raise ValueError(
            f'{what}={width} is not divisible by num_heads={h}.')

    def project(x, width, name):
      y = hk.Linear(width, w_init=linear_init(), name=name)(x)
      return y.reshape(y.shape[:-1] + (h, width // h))  # [B, T, H, width/H]

    q = project(inputs_q, qk_channels, 'query')  # [B, N, H, K]
    k = project(inputs_kv, qk_channels, 'key')  # [B, M, H, K]
    v = project(inputs_kv, v_channels, 'value')  # [B, M, H, V]
    out = dot_product_attention(q, k, v, mask)  # [B, N, H, V]
    out = out.reshape(out.shape[:-2] + (v_channels,))  # [B, N, H*V]
    out = hk.Linear(output_channels, w_init=linear_init(), name='output')(out)
    return _dropout(out, self._dropout_prob, is_training)


class CrossAttention(hk.Module):
  """Cross-attend block: latents attend to the byte array, then an MLP.

  x = q + Attn(LN(q), LN(kv)) (query residual optional); x += MLP(LN(x)).
  """

  def __init__(self, num_heads: int = 1, qk_channels: Optional[int] = None,
               v_channels: Optional[int] = None, widening_factor: int = 1,
               dropout_prob: float = 0.0, use_query_residual: bool = True,
               name: Optional[str] = None):
    super().__init__(name=name)
    self._num_heads = num_heads
    self._qk_channels = qk_channels
    self._v_channels = v_channels
    self._widening_factor = widening_factor
    self._dropout_prob = dropout_prob
    self._use_query_residual = use_query_residual

  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array, *,
               is_training: bool, mask: Optional[jax.Array] = None
               ) -> jax.Array:
    """Maps queries [B, N, D] and inputs [B, M, C] (mask [B, M]) to [B, N, D]."""
    attn = Attention(
        num_heads=self._num_heads, qk_channels=self._qk_channels,
        v_channels=self._v_channels, dropout_prob=self._dropout_prob,
        name='attention')(
            layer_norm('query_norm')(inputs_q),
            layer_norm('input_norm')(inputs_kv),
            is_training=is_training, mask=mask)
    x = inputs_q + attn if self._use_query_residual else attn
    mlp = MLP(self._widening_factor, self._dropout_prob, name='mlp')
    return x + mlp(layer_norm('mlp_norm')(x), is_training=is_training)


class SelfAttention(hk.Module):
  """GPT-2 style pre-LN block: x += Attn(LN(x)); x += MLP(LN(x))."""

  def __init__(self, num_heads: int = 8, qk_channels: Optional[int] = None,
               v_channels: Optional[int] = None, widening_factor: int = 1,
               dropout_prob: float = 0.0, name: Optional[str] = None):
    super().__init__(name=name)
    self._num_heads = num_heads
    self._qk_channels = qk_channels
    self._v_channels = v_channels
    self._widening_factor = widening_factor
    self._dropout_prob = dropout_prob

  def __call__(self, x: jax.Array, *, is_training: bool,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """Maps [B, N, D] (mask [B, N] or [B, N, N]) to [B, N, D]."""
    y = layer_norm('attention_norm')(x)
    x = x + Attention(
        num_heads=self._num_heads, qk_channels=self._qk_channels,
        v_channels=self._v_channels, dropout_prob=self._dropout_prob,
        name='attention')(y, y, is_training=is_training, mask=mask)
    mlp = MLP(self._widening_factor, self._dropout_prob, name='mlp')
    return x + mlp(layer_norm('mlp_norm')(x), is_training=is_training)


def _dropout(x: jax.Array, rate: float, is_training: bool) -> jax.Array:
  if is_training and rate > 0.0:
    return hk.dropout(hk.next_rng_key(), rate, x)
  return x
