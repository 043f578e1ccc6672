"""The ops on TPU: Pallas flash attention where its block constraints allow.

Shape letters as in `perceiver_jax.ops`. `jax.experimental.pallas.ops.tpu.
flash_attention` takes heads-first [B, H, L, D] operands with one width D
for q, k and v, and sequence lengths in whole blocks of 128. Padding makes
every Perceiver attention fit, exactly:
  - the widths K and V to one D, a multiple of 128 (zero channels add
    nothing to q . k, and the extra output channels are dropped);
  - the queries N to a multiple of 128 (extra rows dropped);
  - the keys M to a multiple of 128, the padded keys masked out with the
    kernel's segment ids (real keys 1, padding and masked keys 0).
Key masks [B, M] go through the segment ids as well; a query whose keys are
all masked gets zeros, as in the reference. Per-query masks [B, N, M] and
chunk sizes have no kernel form here and run the reference.

The kernel is lowered for TPU only (a Mosaic custom call); tests run it on
CPU under `pltpu.force_tpu_interpret_mode()`.
"""

from typing import Optional

import jax
from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash
import jax.numpy as jnp

from perceiver_jax import ops
from perceiver_jax.ops import byte_array
from perceiver_jax.ops import reference

# The kernel's sequence blocks and the TPU lane width.
_BLOCK = 128


def _round_up(size: int, multiple: int = _BLOCK) -> int:
  return -(-size // multiple) * multiple


def kernel_applies(mask: Optional[jax.Array], n: int) -> bool:
  """Whether the flash kernel takes attention with this mask.

  Key masks only ([B', 1, 1, M]; a per-query mask would need an [N, M]
  bias); N > 0.
  """
  return n > 0 and (mask is None or mask.shape[2] == 1)


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              mask: Optional[jax.Array], *, scale: float,
              chunk_size: Optional[int] = None) -> jax.Array:
  """`ops.reference.attention` (same arguments) with Pallas flash attention.

  chunk_size is ignored: the kernel works in blocks of its own.
  """
  batch, n, heads, qk = q.shape
  m, width = k.shape[1], v.shape[-1]
  if not kernel_applies(mask, n) or m == 0:
    return reference.attention(q, k, v, mask, scale=scale,
                               chunk_size=chunk_size)
  depth = _round_up(max(qk, width))
  n_pad, m_pad = _round_up(n), _round_up(m)

  def heads_first(x, length, length_pad):  # [B, L, H, C] -> [B, H, L', D]
    x = jnp.pad(x, ((0, 0), (0, length_pad - length), (0, 0),
                    (0, depth - x.shape[-1])))
    return jnp.swapaxes(x, 1, 2)

  real = jnp.arange(m_pad) < m  # [M']
  if mask is not None:
    real = real & jnp.pad(mask[:, 0, 0], ((0, 0), (0, m_pad - m)))
  real = jnp.broadcast_to(real, (batch, m_pad))  # [B, M']
  segment_ids = pallas_flash.SegmentIds(
      q=jnp.ones((batch, n_pad), jnp.int32), kv=real.astype(jnp.int32))
  out = pallas_flash.flash_attention(
      heads_first(q, n, n_pad), heads_first(k, m, m_pad),
      heads_first(v, m, m_pad), segment_ids=segment_ids,
      sm_scale=scale)  # [B, H, N', D]
  out = jnp.swapaxes(out, 1, 2)[:, :n, :, :width]  # [B, N, H, V]
  if mask is not None:  # Queries with no real key attend to nothing.
    has_keys = jnp.any(real, axis=-1)[:, None, None, None]
    out = jnp.where(has_keys, out, 0).astype(out.dtype)
  return out.astype(v.dtype)


def attend_to_inputs(q: jax.Array, inputs: byte_array.ByteArray,
                     mask: Optional[jax.Array], *, scale: float,
                     chunk_size: Optional[int] = None) -> jax.Array:
  """`ops.reference.attend_to_inputs` (same arguments) with flash attention
  over the built byte array."""
  return reference.attend_to_dense_inputs(attention, q, inputs, mask,
                                          scale=scale, chunk_size=chunk_size)


ops.register('tpu', ops.Backend(
    attention=attention, attend_to_inputs=attend_to_inputs,
    linear=reference.linear, layer_norm=reference.layer_norm))
