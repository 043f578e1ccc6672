"""Attention and MLP blocks of the Perceiver (P1 App. C).

Shape letters:
  B: batch size.           N: number of queries (latents or output queries).
  M: number of keys/values (byte array length, or latents in self-attention).
  H: number of heads.      D: query (latent) channels.  C: key/value channels.
  K: qk channels per head. V: v channels per head.

The maths (attention, linear maps, LayerNorm) goes through `perceiver_jax.ops`,
which decides per platform how it is computed; the blocks here only
compose it.

Cross-attention has two exact formulations (`formulation=`):
  'direct':        k = x W_k + b_k and v = x W_v + b_v over all M inputs.
  'reformulated':  one head only. Never projects the M-sized byte array:
                   logits = (q W_k^T) x^T (q . b_k is constant along a row and
                   cancels in the softmax), and since every attention row sums
                   to one, softmax(.) (x W_v + b_v) = (softmax(.) x) W_v + b_v.
                   It trades 2 M C (K + V) FLOPs of projections for 2 N M
                   (2 C - K - V) + 2 N C (K + V): much cheaper when M >> N.
  'auto':          picks the cheaper one by `formulation_costs`.
Both may also process M in chunks with an online softmax (`chunk_size`), so
the N x M logits are never held all at once.

In both, the scale and offset of the input LayerNorm are folded into the maps
that follow it (`prepare_kv(..., affine=)`): the attention reads the
standardised inputs (x - mean) / std, which depend on no parameter when the
byte array is data, so training never back-propagates into the [B, M, C]
array (no dx matmuls, no LayerNorm backward over M).
"""

import math
from typing import Any, Optional

import haiku as hk
import jax
import jax.numpy as jnp

from perceiver_jax import ops
from perceiver_jax.ops import byte_array

FORMULATIONS = ('auto', 'direct', 'reformulated')


def linear_init() -> hk.initializers.Initializer:
  """Variance scaling 1.0, fan-in, truncated normal (P1 App. C)."""
  return hk.initializers.VarianceScaling(1.0, 'fan_in', 'truncated_normal')


class LayerNorm(hk.LayerNorm):
  """hk.LayerNorm over channels (eps 1e-5) that can also hand out its parts.

  Parameters 'scale' and 'offset' [C] as in hk.LayerNorm. `standardize`
  returns the normalised inputs without the affine part, plus that part,
  for callers that fold it into the linear map that follows.
  """

  def __init__(self, name: Optional[str] = None):
    super().__init__(axis=-1, create_scale=True, create_offset=True,
                     eps=1e-5, name=name)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., C] -> (x - mean) / std * scale + offset, [..., C]."""
    return ops.layer_norm(x, *self._affine(x), self.eps)

  def standardize(self, x: byte_array.ByteArray
                  ) -> tuple[byte_array.ByteArray, jax.Array, jax.Array]:
    """[..., C] -> ((x - mean) / std [..., C], scale [C], offset [C]).

    A SplitByteArray x gives a StandardizedByteArray: statistics only.
    """
    return (ops.standardize(x, self.eps), *self._affine(x))

  def _affine(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    channels = x.shape[-1]
    scale = hk.get_parameter('scale', [channels], x.dtype, init=jnp.ones)
    offset = hk.get_parameter('offset', [channels], x.dtype, init=jnp.zeros)
    return scale, offset


def layer_norm(name: str) -> LayerNorm:
  return LayerNorm(name=name)


def formulation_costs(*, num_queries: int, num_inputs: int,
                      input_channels: int, qk_channels: int, v_channels: int,
                      num_uses: int = 1) -> dict[str, float]:
  """FLOPs per use of one cross-attention, in each formulation.

  `num_uses` counts calls that share weights and inputs (shared P1
  cross-attends): their input projections are computed once and amortised.
  Query and output projections are common to both and left out.
  """
  n, m, c = num_queries, num_inputs, input_channels
  k, v = qk_channels, v_channels
  direct = 2 * m * c * (k + v) / num_uses + 2 * n * m * (k + v)
  reformulated = 2 * n * c * (k + v) + 4 * n * m * c
  return {'direct': direct, 'reformulated': reformulated}


class Dense(hk.Module):
  """y = x W + b, W [C_in, C_out] (hk.Linear's parameter names and init)."""

  def params(self, input_size: int, output_size: int
             ) -> tuple[jax.Array, jax.Array]:
    """The weight [C_in, C_out] and bias [C_out]."""
    w = hk.get_parameter('w', [input_size, output_size], init=linear_init())
    b = hk.get_parameter('b', [output_size], init=jnp.zeros)
    return w, b

  def __call__(self, x: jax.Array, output_size: int) -> jax.Array:
    """Maps [..., C_in] -> [..., C_out]."""
    w, b = self.params(x.shape[-1], output_size)
    return ops.linear(x, w.astype(x.dtype), b.astype(x.dtype))


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
    x = Dense(name='hidden')(x, self._widening_factor * channels)
    x = jax.nn.gelu(x)
    x = Dense(name='output')(x, channels)
    return _dropout(x, self._dropout_prob, is_training)


class Attention(hk.Module):
  """Multi-head attention with q, k, v and output projections (all biased).

  qk_channels defaults to the key/value input width (P1: 261 on ImageNet),
  v_channels to qk_channels and output_channels to the query width.
  Call `prepare_kv` once to reuse the key/value side across calls that
  share weights and inputs.
  """

  def __init__(self, num_heads: int = 8, qk_channels: Optional[int] = None,
               v_channels: Optional[int] = None,
               output_channels: Optional[int] = None,
               dropout_prob: float = 0.0, formulation: str = 'direct',
               chunk_size: Optional[int] = None, num_uses: int = 1,
               name: Optional[str] = None):
    super().__init__(name=name)
    if num_heads < 1:
      raise ValueError(f'num_heads must be >= 1, got {num_heads}.')
    if formulation not in FORMULATIONS:
      raise ValueError(f'formulation must be one of {FORMULATIONS}, got '
                       f'{formulation!r}.')
    if formulation == 'reformulated' and num_heads != 1:
      raise ValueError('The reformulated attention needs num_heads=1, got '
                       f'{num_heads}.')
    self._num_heads = num_heads
    self._qk_channels = qk_channels
    self._v_channels = v_channels
    self._output_channels = output_channels
    self._dropout_prob = dropout_prob
    self._formulation = formulation
    self._chunk_size = chunk_size
    self._num_uses = num_uses
    self._query = Dense(name='query')
    self._key = Dense(name='key')
    self._value = Dense(name='value')
    self._output = Dense(name='output')

  def _widths(self, kv_channels: int) -> tuple[int, int]:
    qk = self._qk_channels or kv_channels
    v = self._v_channels or qk
    for what, width in (('qk_channels', qk), ('v_channels', v)):
      if width % self._num_heads:
        raise ValueError(f'{what}={width} is not divisible by '
                         f'num_heads={self._num_heads}.')
    return qk, v

  def formulation(self, num_queries: int, num_inputs: int,
                  kv_channels: int) -> str:
    """The formulation used for these shapes ('direct' or 'reformulated')."""
    if self._formulation != 'auto':
      return self._formulation
    if self._num_heads != 1:
      return 'direct'
    qk, v = self._widths(kv_channels)
    costs = formulation_costs(
        num_queries=num_queries, num_inputs=num_inputs,
        input_channels=kv_channels, qk_channels=qk, v_channels=v,
        num_uses=self._num_uses)
    return min(costs, key=costs.get)

  def prepare_kv(self, inputs_kv: byte_array.ByteArray, num_queries: int,
                 affine: Optional[tuple[jax.Array, jax.Array]] = None
                 ) -> dict[str, Any]:
    """The key/value side for queries of length N, from [B, M, C] inputs.

    `affine` = (scale, offset), both [C], means the keys and values are
    computed from inputs_kv * scale + offset; the pair is folded into the
    key/value maps instead of being applied to the [B, M, C] inputs. Inputs
    held in parts (`byte_array`) stay so in the reformulated formulation;
    the direct one builds them.
    """
    formulation = self.formulation(num_queries, *inputs_kv.shape[1:])
    prepared = {'formulation': formulation, 'inputs': inputs_kv,
                'affine': affine}
    if formulation == 'reformulated':
      return prepared
    inputs_kv = byte_array.dense(inputs_kv)
    channels = inputs_kv.shape[-1]
    qk, v = self._widths(channels)
    h = self._num_heads
    for name, dense, width, heads_width in (('k', self._key, qk, qk // h),
                                            ('v', self._value, v, v // h)):
      w, b = self._folded(dense.params(channels, width), affine)
      y = ops.linear(inputs_kv, w.astype(inputs_kv.dtype),
                     b.astype(inputs_kv.dtype))
      prepared[name] = y.reshape(y.shape[:-1] + (h, heads_width))  # [B,M,H,_]
    return prepared

  @staticmethod
  def _folded(weights: tuple[jax.Array, jax.Array],
              affine: Optional[tuple[jax.Array, jax.Array]]
              ) -> tuple[jax.Array, jax.Array]:
    """(W, b) of x -> (x * scale + offset) W + b, i.e. diag(scale) W and
    offset W + b."""
    w, b = weights
    if affine is None:
      return w, b
    scale, offset = affine
    return scale[:, None] * w, jnp.dot(offset, w) + b

  def __call__(self, inputs_q: jax.Array,
               inputs_kv: Optional[jax.Array] = None, *, is_training: bool,
               mask: Optional[jax.Array] = None,
               prepared: Optional[dict[str, Any]] = None) -> jax.Array:
    """Attends from [B, N, D] queries to [B, M, C] keys/values -> [B, N, D'].

    Pass either inputs_kv or `prepared` (from prepare_kv on the same inputs).
    """
    if prepared is None:
      prepared = self.prepare_kv(inputs_kv, inputs_q.shape[1])
    inputs_kv = prepared['inputs']
    kv_channels = inputs_kv.shape[-1]
    qk, v_channels = self._widths(kv_channels)
    output_channels = self._output_channels or inputs_q.shape[-1]
    h = self._num_heads
    q = self._query(inputs_q, qk)  # [B, N, qk]
    if prepared['formulation'] == 'reformulated':
      affine = prepared['affine']
      # b_k (and the offset's share of the logits) cancel in the softmax.
      w_k, _ = self._folded(self._key.params(kv_channels, qk), affine)
      w_v, b_v = self._folded(self._value.params(kv_channels, v_channels),
                              affine)
      q_in = jnp.dot(q, w_k.T.astype(q.dtype))  # [B, N, C]
      attended = ops.attend_to_inputs(
          q_in, inputs_kv, mask, scale=1.0 / math.sqrt(qk),
          chunk_size=self._chunk_size)  # [B, N, C]
      out = jnp.dot(attended, w_v.astype(q.dtype))  # [B, N, V]
      bias = b_v.astype(q.dtype)
      if mask is not None:  # Rows with no real key attend to nothing.
        any_key = ops.check_mask(mask, *q.shape[:2], inputs_kv.shape[1])
        bias = bias * jnp.any(any_key[:, 0], axis=-1)[..., None]
      out = out + bias
    else:
      q = q.reshape(q.shape[:-1] + (h, qk // h))  # [B, N, H, K]
      out = ops.attention(q, prepared['k'], prepared['v'], mask,
                          chunk_size=self._chunk_size)
      out = out.reshape(out.shape[:-2] + (v_channels,))  # [B, N, H*V]
    out = self._output(out, output_channels)
    return _dropout(out, self._dropout_prob, is_training)


class CrossAttention(hk.Module):
  """Cross-attend block: latents attend to the byte array, then an MLP.

  x = q + Attn(LN(q), LN(kv)) (query residual optional); x += MLP(LN(x)).
  `prepare(inputs)` computes LN(kv) (and the projections the formulation
  needs) once, for cross-attends that share weights and inputs.
  """

  def __init__(self, num_heads: int = 1, qk_channels: Optional[int] = None,
               v_channels: Optional[int] = None, widening_factor: int = 1,
               dropout_prob: float = 0.0, use_query_residual: bool = True,
               formulation: str = 'auto', chunk_size: Optional[int] = None,
               num_uses: int = 1, name: Optional[str] = None):
    super().__init__(name=name)
    self._use_query_residual = use_query_residual
    self._query_norm = layer_norm('query_norm')
    self._input_norm = layer_norm('input_norm')
    self._attention = Attention(
        num_heads=num_heads, qk_channels=qk_channels, v_channels=v_channels,
        dropout_prob=dropout_prob, formulation=formulation,
        chunk_size=chunk_size, num_uses=num_uses, name='attention')
    self._mlp_norm = layer_norm('mlp_norm')
    self._mlp = MLP(widening_factor, dropout_prob, name='mlp')

  def prepare(self, inputs_kv: jax.Array, num_queries: int) -> dict[str, Any]:
    """LN and key/value side of the [B, M, C] inputs, for N queries."""
    normalized, scale, offset = self._input_norm.standardize(inputs_kv)
    return self._attention.prepare_kv(normalized, num_queries,
                                      affine=(scale, offset))

  def __call__(self, inputs_q: jax.Array,
               inputs_kv: Optional[jax.Array] = None, *, is_training: bool,
               mask: Optional[jax.Array] = None,
               prepared: Optional[dict[str, Any]] = None) -> jax.Array:
    """Maps queries [B, N, D] and inputs [B, M, C] (mask [B, M]) to [B, N, D]."""
    if prepared is None:
      prepared = self.prepare(inputs_kv, inputs_q.shape[1])
    attn = self._attention(self._query_norm(inputs_q), is_training=is_training,
                           mask=mask, prepared=prepared)
    x = inputs_q + attn if self._use_query_residual else attn
    return x + self._mlp(self._mlp_norm(x), is_training=is_training)


class SelfAttention(hk.Module):
  """GPT-2 style pre-LN block: x += Attn(LN(x)); x += MLP(LN(x))."""

  def __init__(self, num_heads: int = 8, qk_channels: Optional[int] = None,
               v_channels: Optional[int] = None, widening_factor: int = 1,
               dropout_prob: float = 0.0, name: Optional[str] = None):
    super().__init__(name=name)
    self._attention_norm = layer_norm('attention_norm')
    self._attention = Attention(
        num_heads=num_heads, qk_channels=qk_channels, v_channels=v_channels,
        dropout_prob=dropout_prob, name='attention')
    self._mlp_norm = layer_norm('mlp_norm')
    self._mlp = MLP(widening_factor, dropout_prob, name='mlp')

  def __call__(self, x: jax.Array, *, is_training: bool,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """Maps [B, N, D] (mask [B, N] or [B, N, N]) to [B, N, D]."""
    y = self._attention_norm(x)
    x = x + self._attention(y, y, is_training=is_training, mask=mask)
    return x + self._mlp(self._mlp_norm(x), is_training=is_training)


def _dropout(x: jax.Array, rate: float, is_training: bool) -> jax.Array:
  if is_training and rate > 0.0:
    return hk.dropout(hk.next_rng_key(), rate, x)
  return x

