"""Attention and MLP blocks of the Perceiver (P1 App. C).

Shape letters:
  B: batch size.           N: number of queries (latents or output queries).
  M: number of keys/values (byte array length, or latents in self-attention).
  H: number of heads.      D: query (latent) channels.  C: key/value channels.
  K: qk channels per head. V: v channels per head.    c: chunk of M.

Every block calls `dot_product_attention`, the one place that computes
softmax(q k^T / sqrt(K)) v, so it can be swapped for a fused kernel. On CPU,
unmasked float32 attention is one fused OpenBLAS kernel per pass
(perceiver_jax.kernels.cpu_attention), and other attention products and the
weight gradients of `linear` run through OpenBLAS
(perceiver_jax.kernels.cpu_matmul), unless the model's `cpu_matmul` is 'xla'
(or its `fused_cpu_attention` False, for the fused kernel).

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

import functools
import math
from typing import Any, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp

from perceiver_jax.kernels import cpu_attention
from perceiver_jax.kernels import cpu_matmul
from perceiver_jax.modules import byte_array

FORMULATIONS = ('auto', 'direct', 'reformulated')


def linear_init() -> hk.initializers.Initializer:
  """Variance scaling 1.0, fan-in, truncated normal (P1 App. C)."""
  return hk.initializers.VarianceScaling(1.0, 'fan_in', 'truncated_normal')


class LayerNorm(hk.LayerNorm):
  """hk.LayerNorm over channels (eps 1e-5) that can also hand out its parts.

  Parameters 'scale' and 'offset' [C] as in hk.LayerNorm; its gradient is
  written out (`_layer_norm`). `standardize` returns the normalised inputs
  without the affine part, plus that part, for callers that fold it into the
  linear map that follows.
  """

  def __init__(self, name: Optional[str] = None):
    super().__init__(axis=-1, create_scale=True, create_offset=True,
                     eps=1e-5, name=name)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., C] -> (x - mean) / std * scale + offset, [..., C]."""
    return _layer_norm(x, *self._affine(x), self.eps)

  def standardize(self, x: byte_array.ByteArray
                  ) -> tuple[byte_array.ByteArray, jax.Array, jax.Array]:
    """[..., C] -> ((x - mean) / std [..., C], scale [C], offset [C]).

    A SplitByteArray x gives a StandardizedByteArray: statistics only.
    """
    if isinstance(x, byte_array.SplitByteArray):
      return (byte_array.standardize(x, self.eps), *self._affine(x))
    normalized, _ = _standardize(x, self.eps)
    return (normalized, *self._affine(x))

  def _affine(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    channels = x.shape[-1]
    scale = hk.get_parameter('scale', [channels], x.dtype, init=jnp.ones)
    offset = hk.get_parameter('offset', [channels], x.dtype, init=jnp.zeros)
    return scale, offset


def _standardize(x, eps):
  """[..., C] -> ((x - mean) / std, 1 / std [..., 1])."""
  centered = x - jnp.mean(x, axis=-1, keepdims=True)
  inv_std = jax.lax.rsqrt(
      jnp.mean(jnp.square(centered), axis=-1, keepdims=True) + eps)
  return centered * inv_std, inv_std


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, offset, eps):
  """LayerNorm over the last axis, with its gradient written out.

  Against JAX's own gradient, training steps took 0.91-0.94x as long on
  bench_a and 0.96x on bench_b (paired medians, both in one process,
  alternating step by step).
  """
  return _standardize(x, eps)[0] * scale + offset


def _layer_norm_fwd(x, scale, offset, eps):
  normalized, inv_std = _standardize(x, eps)
  return normalized * scale + offset, (normalized, inv_std, scale)


def _layer_norm_bwd(eps, residuals, g):
  del eps
  normalized, inv_std, scale = residuals
  g_scaled = g * scale
  dx = inv_std * (g_scaled - jnp.mean(g_scaled, axis=-1, keepdims=True)
                  - normalized * jnp.mean(g_scaled * normalized, axis=-1,
                                          keepdims=True))
  batch_axes = tuple(range(g.ndim - 1))
  return (dx, jnp.sum(g * normalized, axis=batch_axes),
          jnp.sum(g, axis=batch_axes))


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm(name: str) -> LayerNorm:
  return LayerNorm(name=name)


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
                          mask: Optional[jax.Array] = None, *,
                          scale: Optional[float] = None,
                          chunk_size: Optional[int] = None) -> jax.Array:
  """Multi-head scaled dot-product attention.

  Logits are scaled by `scale` (default 1/sqrt(K)) and normalised in float32
  whatever the compute dtype. Queries whose keys are all masked attend to
  nothing and return zeros.

  Args:
    q: [B, N, H, K] queries.
    k: [B, M, H, K] keys.
    v: [B, M, H, V] values.
    mask: optional boolean [B, M] (True = real key) or [B, N, M].
    scale: logit scale; 1/sqrt(K) if None.
    chunk_size: if set and < M, process the keys in chunks of this size with
      an online softmax: memory O(N c) instead of O(N M), same result. The
      fused CPU kernel (used for unmasked float32 attention on CPU, see the
      module docstring) always works in tiles of 256 keys and ignores it.

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
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f'chunk_size must be >= 1, got {chunk_size}.')
  scale = 1.0 / math.sqrt(qk) if scale is None else scale
  if mask is not None:
    mask = _check_mask(mask, batch, n, m)
  use_blas = cpu_matmul.enabled()
  if _fused_kernel_applies(mask, q, k, v):
    # One fused kernel per pass, for any M: it never holds the [B, H, N, M]
    # logits, so chunk_size has nothing left to bound.
    return cpu_attention.attention(q * scale, k, v)
  if chunk_size is not None and chunk_size < m:
    return _chunked_attention(q, k, v, mask, scale, chunk_size, use_blas)
  if mask is None and jax.default_backend() == 'gpu':
    # cuDNN flash attention where the shapes and dtype allow it.
    return jax.nn.dot_product_attention(q, k, v, scale=scale)
  if heads == 1:  # Without the head axis: no transposes, no size-1 axes
    # (XLA:CPU reduces slowly over those).
    mask = None if mask is None else mask[:, 0]  # [B, N|1, M]
    # Logits keys-major on CPU (see _attend).
    keys_major = jax.default_backend() == 'cpu'
    return _attend(q[:, :, 0], k[:, :, 0], v[:, :, 0], mask, scale,
                   keys_major, use_blas)[:, :, None]
  # Head-first batched matmuls: faster than [B, N, H, K] einsums on CPU.
  out = _attend(jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2),
                jnp.swapaxes(v, 1, 2), mask, scale, False,
                use_blas)  # [B, H, N, V]
  return jnp.swapaxes(out, 1, 2)


def _fused_kernel_applies(mask: Optional[jax.Array], *operands) -> bool:
  """Whether attention over these operands runs as the fused CPU kernel:
  unmasked, float32, and the kernel enabled while tracing."""
  return (mask is None and cpu_attention.enabled() and
          {x.dtype for x in operands} == {jnp.dtype(jnp.float32)})


def _product(use_blas: bool):
  """The einsum of the attention and linear products (forward and
  backward): `cpu_matmul.einsum`, which runs batched matrix products through
  OpenBLAS where `use_blas` (decided by `cpu_matmul.enabled()` when the
  forward pass is traced, then carried to the backward pass). On bench_a's
  training step, XLA:CPU ran self-attention's per-head products at 40-50
  GFLOP/s; through the kernel the step took 0.86-0.91x as long (README).
  """
  return functools.partial(cpu_matmul.einsum, use_blas=use_blas)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attend(q, k, v, mask, scale, keys_major, use_blas):
  """softmax(q k^T scale) v for q [..., N, K], k [..., M, K], v [..., M, V]
  and a mask broadcastable to [..., N, M] (or None); the leading axes are
  [B, H] (head-first) or [B] (one head). Queries with no real key give 0.

  The scale is applied to q (N x K numbers, not N x M logits). The backward
  pass takes the softmax's row sums sum_m(dP * P) as sum_v(dO * O), over V
  channels instead of M keys (as FlashAttention does): the same number,
  without a reduction over the [..., N, M] array.

  keys_major holds the logits and weights as [..., M, N] instead: same
  result, faster for the one-head cross-attention on XLA:CPU. At bench_a's
  shapes (batch 16, N = 128 queries, M = 4,096 keys, K = V = 133 channels)
  the products ran at 84 GFLOP/s (k q^T, against 74 for q k^T), 126
  (weights^T v, against 93) and 126 (the backward's dlogits^T k, against
  99), and forward + backward took 115 ms instead of 160 (same process,
  alternating).

  use_blas: the products run through `cpu_matmul` (see `_product`).
  """
  return _attend_fwd(q, k, v, mask, scale, keys_major, use_blas)[0]


def _logits_axes(keys_major: bool) -> tuple[str, int]:
  """einsum axes of the logits [..., N, M] or [..., M, N], and the keys'."""
  return ('...mn', -2) if keys_major else ('...nm', -1)


def _unbroadcast(q, k):
  """q, made to depend on k's batch.

  XLA:CPU (jaxlib 0.10.2) miscompiles keys-major logits k q^T when q is a
  broadcast over the batch (queries shared by all examples, as latents are)
  and the softmax's max over M fuses with the product: wrong numbers or NaN
  (e.g. at B, N, K, M = 4, 32, 13, 256). Adding 0 * k[..., 0, 0] (which XLA
  does not fold: 0 * x is not 0 for every float) keeps q a per-example
  array. Wrapping q in an optimization barrier instead does not help
  (tests/modules/test_attention.py fails with it).
  """
  return q + 0.0 * k[..., :1, :1]


def _attend_fwd(q, k, v, mask, scale, keys_major, use_blas):
  einsum = _product(use_blas)
  perturbed = [getattr(t, 'perturbed', True) for t in (q, k, v)]
  q, k, v, mask = [getattr(t, 'value', t) for t in (q, k, v, mask)]
  axes, key_axis = _logits_axes(keys_major)
  q = q * scale
  if keys_major:
    q = _unbroadcast(q, k)
  logits = einsum(f'...nk,...mk->{axes}', q, k).astype(jnp.float32)
  if mask is None:
    weights = jax.nn.softmax(logits, axis=key_axis)
  else:
    if keys_major:
      mask = jnp.swapaxes(mask, -1, -2)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    # A query with no real key would otherwise spread weight uniformly.
    weights = jnp.where(jnp.any(mask, axis=key_axis, keepdims=True),
                        jax.nn.softmax(logits, axis=key_axis), 0.0)
  out = einsum(f'{axes},...mv->...nv', weights.astype(v.dtype), v)
  # None marks a gradient that is not needed (symbolic zeros).
  need_q, need_k, need_v = perturbed
  return out, (k if need_q else None, q if need_k else None, need_v or None,
               v, weights, out)


def _attend_bwd(scale, keys_major, use_blas, residuals, g):
  einsum = _product(use_blas)
  k_for_dq, scaled_q_for_dk, need_dv, v, weights, out = residuals
  axes, key_axis = _logits_axes(keys_major)
  dv = None if need_dv is None else einsum(
      f'{axes},...nv->...mv', weights.astype(g.dtype), g)
  dweights = einsum(f'...nv,...mv->{axes}', g, v).astype(jnp.float32)
  row_sums = jnp.expand_dims(jnp.sum(
      g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1), key_axis)
  dlogits = (weights * (dweights - row_sums)).astype(g.dtype)
  dq = None if k_for_dq is None else einsum(
      f'{axes},...mk->...nk', dlogits, k_for_dq) * scale
  dk = None if scaled_q_for_dk is None else einsum(
      f'{axes},...nk->...mk', dlogits, scaled_q_for_dk)
  return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd, symbolic_zeros=True)


def _chunked_attention(q, k, v, mask, scale, chunk_size, use_blas):
  """dot_product_attention over chunks of M with an online softmax.

  q [B, N, H, K], k [B, M, H, K], v [B, M, H, V], mask [B', 1, N', M] or
  None -> [B, N, H, V]. Chunks are sliced out of k, v (and the mask) inside
  the loop, never copied into a chunked layout. The logits stay query-major
  here: keys-major chunks (as `_attend` can hold them) were 3-5% slower at
  bench_b's shapes.
  """
  if q.shape[2] == 1:  # No head axis, as in dot_product_attention.
    mask = None if mask is None else mask[:, 0]  # [B', N', M]
    out = _chunked(q[:, :, 0], k[:, :, 0], v[:, :, 0], mask, scale,
                   chunk_size, _ChunkSpecs('bnk', 'bck', 'bcv', 'bnc'),
                   use_blas)
    return out[:, :, None]
  # Head-first queries and logits, as in dot_product_attention.
  out = _chunked(jnp.swapaxes(q, 1, 2), k, v, mask, scale, chunk_size,
                 _ChunkSpecs('bhnk', 'bchk', 'bchv', 'bhnc'), use_blas)
  return jnp.swapaxes(out, 1, 2)


class _ChunkSpecs(NamedTuple):
  """einsum axes of the chunked attention's arrays: queries, a chunk of keys
  and of values, the chunk's logits (c = chunk axis). The output has the
  queries' axes with v for k; the softmax statistics, the logits' without c.
  """
  q: str
  k: str
  v: str
  logits: str

  @property
  def out(self) -> str:
    return self.q.replace('k', 'v')

  @property
  def chunk_axis(self) -> int:
    return self.logits.index('c')


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _chunked(q, k, v, mask, scale, chunk_size, specs, use_blas):
  """softmax(q k^T scale) v in chunks of M; arrays laid out as `specs` says.

  The mask (or None) is laid out as the logits, with all of M for c.
  Nothing of size M is stored for the backward pass beyond the inputs: it
  recomputes each chunk's weights from the saved log-sum-exp of every
  query's logits, as FlashAttention does.
  """
  return _chunked_fwd(q, k, v, mask, scale, chunk_size, specs, use_blas)[0]


def _chunk_scan(step, carry, m, chunk_size):
  """Runs carry = step(carry, start, size) over the chunks of M."""
  starts = jnp.arange(m // chunk_size) * chunk_size
  carry, _ = jax.lax.scan(lambda c, s: (step(c, s, chunk_size), None), carry,
                          starts)
  if m % chunk_size:  # The last, shorter chunk.
    carry = step(carry, m - m % chunk_size, m % chunk_size)
  return carry


def _chunk_logits(q, k, v, mask, start, size, specs, einsum):
  """A chunk's keys, values, mask (or None) and float32 logits."""
  kc, vc = (jax.lax.dynamic_slice_in_dim(x, start, size, 1) for x in (k, v))
  mc = None if mask is None else jax.lax.dynamic_slice_in_dim(
      mask, start, size, specs.chunk_axis)
  logits = einsum(f'{specs.q},{specs.k}->{specs.logits}', q, kc)
  return kc, vc, mc, logits.astype(jnp.float32)


def _chunked_fwd(q, k, v, mask, scale, chunk_size, specs, use_blas):
  einsum = _product(use_blas)
  need = [getattr(t, 'perturbed', True) for t in (q, k, v)]
  q, k, v, mask = [getattr(t, 'value', t) for t in (q, k, v, mask)]
  q = q * scale
  axis = specs.chunk_axis
  lead = q.shape[:-1]  # Of the queries: [B, (H,) N].
  lowest = jnp.finfo(jnp.float32).min

  def step(carry, start, size):
    running_max, denom, acc = carry  # lead, lead, lead + [V]
    _, vc, mc, logits = _chunk_logits(q, k, v, mask, start, size, specs,
                                        einsum)
    if mc is not None:
      logits = jnp.where(mc, logits, lowest)
    new_max = jnp.maximum(running_max, jnp.max(logits, axis=axis))
    p = jnp.exp(logits - jnp.expand_dims(new_max, axis))
    if mc is not None:
      p = jnp.where(mc, p, 0.0)
    correction = jnp.exp(running_max - new_max)
    denom = denom * correction + jnp.sum(p, axis=axis)
    acc = acc * correction[..., None] + einsum(
        f'{specs.logits},{specs.v}->{specs.out}', p.astype(v.dtype),
        vc).astype(jnp.float32)
    return new_max, denom, acc

  carry = (jnp.full(lead, lowest, jnp.float32), jnp.zeros(lead, jnp.float32),
           jnp.zeros(lead + (v.shape[-1],), jnp.float32))
  running_max, denom, acc = _chunk_scan(step, carry, k.shape[1], chunk_size)
  has_keys = denom > 0  # False for a query whose keys are all masked.
  out = jnp.where(has_keys[..., None],
                  acc / jnp.where(has_keys, denom, 1.0)[..., None], 0.0)
  # log sum_m exp(logits); 0 where there are no keys (their weights are 0).
  log_sum = jnp.where(has_keys, running_max + jnp.log(
      jnp.where(has_keys, denom, 1.0)), 0.0)
  out = out.astype(v.dtype)
  return out, (q, k, v, mask, out, log_sum, need)


def _chunked_bwd(scale, chunk_size, specs, use_blas, residuals, g):
  einsum = _product(use_blas)
  q, k, v, mask, out, log_sum, (need_q, need_k, need_v) = residuals
  axis = specs.chunk_axis
  # The softmax's row sums, sum_m dP * P = sum_v dO * O (as in _attend_bwd).
  row_sums = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), -1)
  row_sums, log_sum = (jnp.expand_dims(x, axis) for x in (row_sums, log_sum))

  def step(carry, start, size):
    dq, dk, dv = carry
    kc, vc, mc, logits = _chunk_logits(q, k, v, mask, start, size, specs,
                                        einsum)
    p = jnp.exp(logits - log_sum)  # The weights.
    if mc is not None:
      p = jnp.where(mc, p, 0.0)
    dp = einsum(f'{specs.out},{specs.v}->{specs.logits}', g,
                vc).astype(jnp.float32)
    dlogits = (p * (dp - row_sums)).astype(g.dtype)
    if need_q:
      dq = dq + einsum(f'{specs.logits},{specs.k}->{specs.q}', dlogits,
                       kc).astype(jnp.float32)
    if need_k:
      dk = jax.lax.dynamic_update_slice_in_dim(dk, einsum(
          f'{specs.logits},{specs.q}->{specs.k}', dlogits, q).astype(
              dk.dtype), start, 1)
    if need_v:
      dv = jax.lax.dynamic_update_slice_in_dim(dv, einsum(
          f'{specs.logits},{specs.out}->{specs.v}', p.astype(g.dtype),
          g).astype(dv.dtype), start, 1)
    return dq, dk, dv

  carry = (jnp.zeros(q.shape, jnp.float32) if need_q else None,
           jnp.zeros_like(k) if need_k else None,
           jnp.zeros_like(v) if need_v else None)
  dq, dk, dv = _chunk_scan(step, carry, k.shape[1], chunk_size)
  dq = None if dq is None else (dq * scale).astype(q.dtype)
  return dq, dk, dv, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd, symbolic_zeros=True)


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
    return linear(x, w.astype(x.dtype), b.astype(x.dtype))


def linear(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """x W + b for x [..., C_in], W [C_in, C_out], b [C_out]."""
  return _linear(x, w, b, cpu_matmul.enabled())


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _linear(x, w, b, use_blas):
  del use_blas  # Only the weight gradient runs through cpu_matmul.
  return jnp.dot(x, w) + b


# The gradients of `linear` and `_attend` are written out so that XLA:CPU
# gets weight gradients as x^T g with the activation x (stored by the forward
# pass) as the transposed operand, rather than the output gradient g, whose
# transposed copy XLA fuses with the whole chain of residual-stream gradients
# above it (recomputed once per layer: quadratic in depth). Gradients with
# respect to inputs that need none (data, constants) are skipped, so they are
# neither run nor counted in FLOPs.


def _linear_fwd(x, w, b, use_blas):
  # Residuals hold None where no gradient is needed (symbolic zeros).
  out = _linear(x.value, w.value, b.value, use_blas)
  return out, (w.value if x.perturbed else None,
               x.value if w.perturbed else None)


def _linear_bwd(use_blas, residuals, g):
  w_for_dx, x_for_dw = residuals
  g2 = g.reshape(-1, g.shape[-1])
  dx = None if w_for_dx is None else jnp.dot(g, w_for_dx.T)
  dw = None if x_for_dw is None else _product(use_blas)(
      'ri,ro->io', x_for_dw.reshape(-1, x_for_dw.shape[-1]), g2)
  return dx, dw, jnp.sum(g2, axis=0)  # db: cheap, dropped by XLA if unused.


_linear.defvjp(_linear_fwd, _linear_bwd, symbolic_zeros=True)


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
      y = linear(inputs_kv, w.astype(inputs_kv.dtype),
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
      attended = _attend_to_inputs(q_in, inputs_kv, mask, 1.0 / math.sqrt(qk),
                                   self._chunk_size)  # [B, N, C]
      out = jnp.dot(attended, w_v.astype(q.dtype))  # [B, N, V]
      bias = b_v.astype(q.dtype)
      if mask is not None:  # Rows with no real key attend to nothing.
        any_key = _check_mask(mask, *q.shape[:2], inputs_kv.shape[1])
        bias = bias * jnp.any(any_key[:, 0], axis=-1)[..., None]
      out = out + bias
    else:
      q = q.reshape(q.shape[:-1] + (h, qk // h))  # [B, N, H, K]
      out = dot_product_attention(q, prepared['k'], prepared['v'], mask,
                                  chunk_size=self._chunk_size)
      out = out.reshape(out.shape[:-2] + (v_channels,))  # [B, N, H*V]
    out = self._output(out, output_channels)
    return _dropout(out, self._dropout_prob, is_training)


def _attend_to_inputs(q: jax.Array, inputs: byte_array.ByteArray,
                      mask: Optional[jax.Array], scale: float,
                      chunk_size: Optional[int]) -> jax.Array:
  """One-head softmax(q x^T * scale) x: q [B, N, C], inputs x [B, M, C].

  Standardised inputs held in parts go to the fused CPU kernel that never
  builds them (`cpu_attention.standardized_attention`) when
  `dot_product_attention` would use the fused kernel too.
  """
  if (isinstance(inputs, byte_array.StandardizedByteArray) and
      _fused_kernel_applies(mask, q, inputs)):
    split = inputs.inputs
    return cpu_attention.standardized_attention(
        q * scale, split.features, split.shared, inputs.mean, inputs.inv_std)
  x = byte_array.dense(inputs)[:, :, None]  # [B, M, 1, C]
  return dot_product_attention(q[:, :, None], x, x, mask, scale=scale,
                               chunk_size=chunk_size)[:, :, 0]


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
