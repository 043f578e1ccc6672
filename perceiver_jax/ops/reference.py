"""The reference implementation of the ops: plain jnp, JAX's own gradients.

Shape letters as in `perceiver_jax.ops`. Every formula is stated once, as
in the papers (P1 App. C): callers have validated the shapes and brought
masks to [B', 1, N', M] (`ops.attention`). Compute follows the inputs'
dtype; the softmax and the LayerNorm statistics run in float32 whatever it
is, so bf16 compute keeps float32 normalisation.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from perceiver_jax.ops import byte_array
from perceiver_jax.ops import chunked


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              mask: Optional[jax.Array], *, scale: float,
              chunk_size: Optional[int] = None) -> jax.Array:
  """softmax(q k^T * scale) v per example and head.

  Args:
    q: [B, N, H, K] queries.
    k: [B, M, H, K] keys.
    v: [B, M, H, V] values.
    mask: boolean [B', 1, N', M] (True = attend), or None.
    scale: logit scale.
    chunk_size: if < M, the keys are processed in chunks with an online
      softmax (`chunked`): same result, O(N c) memory.

  Returns:
    [B, N, H, V] in v's dtype; zeros for a query whose keys are all masked.
  """
  if chunk_size is not None and chunk_size < k.shape[1]:
    return chunked.attention(q, k, v, mask, scale, chunk_size)
  logits = jnp.einsum('bnhk,bmhk->bhnm', q * scale, k).astype(jnp.float32)
  if mask is None:
    weights = jax.nn.softmax(logits, axis=-1)
  else:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    # A query with no real key would otherwise spread its weight uniformly.
    weights = jnp.where(jnp.any(mask, axis=-1, keepdims=True),
                        jax.nn.softmax(logits, axis=-1), 0.0)
  return jnp.einsum('bhnm,bmhv->bnhv', weights.astype(v.dtype), v)


def attend_to_inputs(q: jax.Array, inputs: byte_array.ByteArray,
                     mask: Optional[jax.Array], *, scale: float,
                     chunk_size: Optional[int] = None) -> jax.Array:
  """One-head softmax(q x^T * scale) x, keys and values both the inputs x.

  Args:
    q: [B, N, C] queries (already mapped into the inputs' channels).
    inputs: [B, M, C], possibly held in parts (`byte_array`); built here.
    mask: as for `attention`, or None.
    scale: logit scale.
    chunk_size: as for `attention`.

  Returns:
    [B, N, C].
  """
  return attend_to_dense_inputs(attention, q, inputs, mask, scale=scale,
                                chunk_size=chunk_size)


def attend_to_dense_inputs(attend, q: jax.Array,
                           inputs: byte_array.ByteArray,
                           mask: Optional[jax.Array], *, scale: float,
                           chunk_size: Optional[int] = None) -> jax.Array:
  """`attend_to_inputs` through a backend's `attend` (the signature of
  `attention`), on the built [B, M, C] byte array as one head."""
  x = byte_array.dense(inputs)[:, :, None]  # [B, M, 1, C]
  return attend(q[:, :, None], x, x, mask, scale=scale,
                chunk_size=chunk_size)[:, :, 0]


def linear(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """x W + b: x [..., C_in], W [C_in, C_out], b [C_out] -> [..., C_out]."""
  return jnp.dot(x, w) + b


def standardize(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """[..., C] -> ((x - mean) / std [..., C], 1 / std [..., 1]).

  The statistics are computed in float32; the result has x's dtype.
  """
  x32 = x.astype(jnp.float32)
  centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  inv_std = jax.lax.rsqrt(
      jnp.mean(jnp.square(centered), axis=-1, keepdims=True) + eps)
  return (centered * inv_std).astype(x.dtype), inv_std.astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, offset: jax.Array,
               eps: float) -> jax.Array:
  """(x - mean) / sqrt(var + eps) * scale + offset over the last axis."""
  return standardize(x, eps)[0] * scale + offset
