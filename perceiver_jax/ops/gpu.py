"""The ops on NVIDIA GPUs: cuDNN flash attention where its constraints allow.

Shape letters as in `perceiver_jax.ops`. `jax.nn.dot_product_attention(...,
implementation='cudnn')` reads our [B, L, H, D] layout directly. It takes
bfloat16 or float16 operands, one width D for q, k and v that is a multiple
of 8 and at most 128 (256 from Hopper on). Padding q, k and v with zero
channels to such a D is exact (the extra output channels are dropped), so
the latent self-attention (8 heads x 128) runs on it as it is. Other cases
run the reference, and the reason is logged once per reason: float32,
masks, and heads wider than the limit, such as the one-head cross-attention
to P1 ImageNet's 261 channels (there the reference's chunked attention
bounds the memory, with `cross_attention_chunk_size`).

JAX checks for cuDNN while tracing `implementation='cudnn'`, on every
platform branch: the backend registers itself only in a process that sees
CUDA devices. A program lowered for 'cuda' on another host holds the
reference attention.
"""

from typing import Optional, Union

from absl import logging
import jax
import jax.numpy as jnp

from perceiver_jax import ops
from perceiver_jax.ops import byte_array
from perceiver_jax.ops import reference

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_logged: set[str] = set()


def cudnn_width(q: jax.ShapeDtypeStruct, v: jax.ShapeDtypeStruct,
                mask: Optional[jax.Array],
                max_width: int) -> Union[int, str]:
  """The padded head width D cuDNN computes with, or why it cannot.

  Args:
    q: [B, N, H, K] queries (shape and dtype).
    v: [B, M, H, V] values.
    mask: the attention's mask, or None.
    max_width: the largest head width the GPU's cuDNN kernels take.

  Returns:
    D, the multiple of 8 >= max(K, V) that q, k and v are padded to; or a
    sentence saying why cuDNN does not apply.
  """
  if jnp.dtype(q.dtype) not in _DTYPES or jnp.dtype(v.dtype) != jnp.dtype(
      q.dtype):
    return f'cuDNN attention needs bfloat16 or float16, got {q.dtype}'
  if mask is not None:
    return 'masked attention'
  width = -(-max(q.shape[-1], v.shape[-1]) // 8) * 8
  if width > max_width:
    return (f'head width {max(q.shape[-1], v.shape[-1])} exceeds cuDNN\'s '
            f'{max_width}')
  return width


def _max_width() -> int:
  """256 on Hopper (compute capability 9.0) and later, else 128."""
  capability = getattr(jax.devices('cuda')[0], 'compute_capability', '0')
  return 256 if float(capability) >= 9.0 else 128


def _log_once(reason: str) -> None:
  if reason not in _logged:
    _logged.add(reason)
    logging.warning('GPU attention runs the reference ops: %s.', reason)


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              mask: Optional[jax.Array], *, scale: float,
              chunk_size: Optional[int] = None) -> jax.Array:
  """`ops.reference.attention` (same arguments) with cuDNN flash attention.

  chunk_size is ignored where cuDNN runs: it never holds the logits.
  """
  width = cudnn_width(q, v, mask, _max_width())
  if isinstance(width, str) or k.shape[1] == 0:
    _log_once(width if isinstance(width, str) else 'no keys')
    return reference.attention(q, k, v, mask, scale=scale,
                               chunk_size=chunk_size)
  pad = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, width - x.shape[-1]),))
  out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), scale=scale,
                                     implementation='cudnn')
  return out[..., :v.shape[-1]]


def attend_to_inputs(q: jax.Array, inputs: byte_array.ByteArray,
                     mask: Optional[jax.Array], *, scale: float,
                     chunk_size: Optional[int] = None) -> jax.Array:
  """`ops.reference.attend_to_inputs` (same arguments), via `attention`."""
  return reference.attend_to_dense_inputs(attention, q, inputs, mask,
                                          scale=scale, chunk_size=chunk_size)


def _has_cuda_devices() -> bool:
  try:
    return bool(jax.devices('cuda'))
  except RuntimeError:  # No CUDA backend in this process.
    return False


if _has_cuda_devices():
  ops.register('cuda', ops.Backend(
      attention=attention, attend_to_inputs=attend_to_inputs,
      linear=reference.linear, layer_norm=reference.layer_norm))
