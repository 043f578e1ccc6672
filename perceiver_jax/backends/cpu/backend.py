"""The CPU backend's ops, registered with `perceiver_jax.ops` on import.

Importing this module builds (or loads from the cache) the kernels' shared
library (`native`) and registers the ops below for the 'cpu' platform.
`ops` imports it on first use and falls back to its reference where the
import fails (no compiler, no OpenBLAS wheel). The model never imports it.

What runs, per op (float32 unless said; other dtypes keep the same choices
and XLA's products):
  attention: unmasked float32 attention is one fused kernel call per pass
    (`attention.attention`; it works in tiles and ignores chunk_size);
    masked attention runs `ops.chunked` with OpenBLAS products when
    chunk_size < M, else `gradients.attend` (one head keys-major).
  attend_to_inputs: a standardised split byte array goes to the kernel that
    builds its rows tile by tile (`attention.standardized_attention`); other
    inputs as `attention` above.
  linear, layer_norm: `gradients`, whose backward passes XLA:CPU runs
    faster than JAX's own.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from perceiver_jax import ops
from perceiver_jax.backends.cpu import attention as fused
from perceiver_jax.backends.cpu import gradients
from perceiver_jax.backends.cpu import matmul
from perceiver_jax.backends.cpu import native
from perceiver_jax.ops import byte_array
from perceiver_jax.ops import chunked
from perceiver_jax.ops import reference

# Every FFI target of the backend, as it reads in compiled HLO text.
HLO_CALLS = (matmul.HLO_CALL,) + fused.HLO_CALLS


def _fused_kernel_applies(mask: Optional[jax.Array], *operands) -> bool:
  """Unmasked and float32: what the fused attention kernels take."""
  return mask is None and {x.dtype for x in operands} == {
      jnp.dtype(jnp.float32)}


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              mask: Optional[jax.Array], *, scale: float,
              chunk_size: Optional[int] = None) -> jax.Array:
  """`ops.reference.attention` (same arguments), on the CPU's kernels."""
  if _fused_kernel_applies(mask, q, k, v):
    return fused.attention(q * scale, k, v)
  if chunk_size is not None and chunk_size < k.shape[1]:
    return chunked.attention(q, k, v, mask, scale, chunk_size,
                             einsum=matmul.einsum)
  if q.shape[2] == 1:  # One head: no transposes, no size-1 axes (XLA:CPU
    # reduces slowly over those), logits keys-major.
    mask = None if mask is None else mask[:, 0]  # [B', N', M]
    return gradients.attend(q[:, :, 0], k[:, :, 0], v[:, :, 0], mask, scale,
                            True)[:, :, None]
  # Head-first batched products: faster than [B, N, H, K] ones on XLA:CPU.
  out = gradients.attend(jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2),
                         jnp.swapaxes(v, 1, 2), mask, scale,
                         False)  # [B, H, N, V]
  return jnp.swapaxes(out, 1, 2)


def attend_to_inputs(q: jax.Array, inputs: byte_array.ByteArray,
                     mask: Optional[jax.Array], *, scale: float,
                     chunk_size: Optional[int] = None) -> jax.Array:
  """`ops.reference.attend_to_inputs` (same arguments), on the CPU."""
  if (isinstance(inputs, byte_array.StandardizedByteArray) and
      _fused_kernel_applies(mask, q, inputs)):
    split = inputs.inputs
    return fused.standardized_attention(
        q * scale, split.features, split.shared, inputs.mean, inputs.inv_std)
  return reference.attend_to_dense_inputs(attention, q, inputs, mask,
                                          scale=scale, chunk_size=chunk_size)


def _attention_flops(eqn) -> int:
  return fused.flops(eqn.params['target_name'],
                     *(v.aval.shape for v in eqn.invars[:3]),
                     **dict(eqn.params['attributes']))


native.register()  # Raises native.BuildError: `ops` then uses the reference.
ops.register('cpu', ops.Backend(
    attention=attention, attend_to_inputs=attend_to_inputs,
    linear=gradients.linear, layer_norm=gradients.layer_norm,
    flop_rules={matmul.TARGET: matmul.flops,
                **{target: _attention_flops for target in fused.TARGETS}}))
