"""Attention over chunks of the keys with an online softmax.

Shape letters as in `perceiver_jax.ops`; c: a chunk of M.

The N x M logits are never held at once: memory O(N c) instead of O(N M),
the same result as the direct softmax up to float32 rounding. The backward
pass stores nothing of size M beyond the inputs; it recomputes each chunk's
weights from the saved log-sum-exp of every query's logits, as
FlashAttention does. Any backend can use it; the products go through the
`einsum` it is given.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


def attention(q, k, v, mask, scale, chunk_size, einsum=jnp.einsum):
  """softmax(q k^T scale) v over chunks of M with an online softmax.

  Args:
    q: [B, N, H, K] queries.
    k: [B, M, H, K] keys.
    v: [B, M, H, V] values.
    mask: boolean [B', 1, N', M] (B' in {1, B}, N' in {1, N}) or None.
    scale: logit scale.
    chunk_size: keys per chunk, >= 1.
    einsum: computes the products, jnp.einsum's signature (a backend may
      pass its own).

  Returns:
    [B, N, H, V]; a query whose keys are all masked gets zeros.

  Chunks are sliced out of k, v (and the mask) inside the loop, never copied
  into a chunked layout.
  """
  if q.shape[2] == 1:  # One head: no head axis, no transposes.
    mask = None if mask is None else mask[:, 0]  # [B', N', M]
    out = _chunked(q[:, :, 0], k[:, :, 0], v[:, :, 0], mask, scale,
                   chunk_size, _ChunkSpecs('bnk', 'bck', 'bcv', 'bnc'),
                   einsum)
    return out[:, :, None]
  # Head-first queries and logits.
  out = _chunked(jnp.swapaxes(q, 1, 2), k, v, mask, scale, chunk_size,
                 _ChunkSpecs('bhnk', 'bchk', 'bchv', 'bhnc'), einsum)
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
def _chunked(q, k, v, mask, scale, chunk_size, specs, einsum):
  """softmax(q k^T scale) v in chunks of M; arrays laid out as `specs` says.

  The mask (or None) is laid out as the logits, with all of M for c.
  Nothing of size M is stored for the backward pass beyond the inputs: it
  recomputes each chunk's weights from the saved log-sum-exp of every
  query's logits, as FlashAttention does.
  """
  return _chunked_fwd(q, k, v, mask, scale, chunk_size, specs, einsum)[0]


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


def _chunked_fwd(q, k, v, mask, scale, chunk_size, specs, einsum):
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


def _chunked_bwd(scale, chunk_size, specs, einsum, residuals, g):
  q, k, v, mask, out, log_sum, (need_q, need_k, need_v) = residuals
  axis = specs.chunk_axis
  # The softmax's row sums, sum_m dP * P, as sum_v dO * O (FlashAttention's
  # trick): over V channels instead of M keys.
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
