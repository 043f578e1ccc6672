"""Fused softmax attention on CPU (XLA FFI calls; csrc/cpu_attention.cc).

`attention(q, k, v)` is softmax(q k^T) v per example and head, for
q [B, N, H, K] (already scaled), k [B, M, H, K], v [B, M, H, V] in float32,
differentiable. Its forward and backward passes are each one call of a C++
kernel that works through the keys in tiles of 256 with an online softmax
(as FlashAttention does on GPUs): a tile of logits is made by OpenBLAS's
sgemm, exponentiated and used by the next sgemm while it is still in the
core's cache, and the [B, H, N, M] logits are never held (memory as
chunked attention's, for any M). Work is shared over XLA's intra-op threads
by example, head and tile.

The CPU backend uses it for every unmasked float32 attention; how it
compares with the chunked attention is in docs/cpu_backend.md.

`standardized_attention(q, features, shared, mean, inv_std)` is the one-head
case where keys and values are both the standardised rows of a byte array
held in two parts, per-example features [B, M, F] and position features
[M, P] that every example shares: its kernels build each tile of rows
(x - mean) * inv_std just before using it, so neither the [B, M, F + P]
byte array nor its standardised copy is ever held (memory then grows with
the input as the [B, M, F] features do). Where the byte array itself needs
a gradient (a learned preprocessor), the backward pass builds the rows once
and runs the backward kernel above for dq and the rows' gradient.
"""

import jax
import jax.numpy as jnp

from perceiver_jax.backends.cpu import native
from perceiver_jax.ops import byte_array

FORWARD_TARGET = 'perceiver_jax_cpu_attention_fwd'
BACKWARD_TARGET = 'perceiver_jax_cpu_attention_bwd'
STANDARDIZED_FORWARD_TARGET = 'perceiver_jax_cpu_attention_standardized_fwd'
STANDARDIZED_BACKWARD_TARGET = 'perceiver_jax_cpu_attention_standardized_bwd'
TARGETS = (FORWARD_TARGET, BACKWARD_TARGET, STANDARDIZED_FORWARD_TARGET,
           STANDARDIZED_BACKWARD_TARGET)
# How calls of the kernels read in compiled HLO text.
HLO_CALLS = tuple(f'custom_call_target="{t}"' for t in TARGETS)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T) v over the keys, per example and head.

  Args:
    q: [B, N, H, K] float32 queries, already scaled.
    k: [B, M, H, K] float32 keys.
    v: [B, M, H, V] float32 values.

  Returns:
    [B, N, H, V] float32 (zeros when M = 0); differentiable in q, k and v.

  Raises:
    ValueError: other ranks, shapes that do not match, or other dtypes.
    native.BuildError: the kernels do not build.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or (
      k.shape[0], k.shape[2:]) != (q.shape[0], q.shape[2:]) or (
          v.shape[:3] != k.shape[:3]):
    raise ValueError('cpu_attention needs q [B, N, H, K], k [B, M, H, K], '
                     f'v [B, M, H, V]; got {q.shape}, {k.shape}, {v.shape}.')
  dtypes = {q.dtype, k.dtype, v.dtype}
  if dtypes != {jnp.dtype(jnp.float32)}:
    raise ValueError('cpu_attention runs in float32; got '
                     f'{sorted(map(str, dtypes))}.')
  native.register()
  return _attention(q, k, v)


@jax.custom_vjp
def _attention(q, k, v):
  return _attention_fwd(q, k, v)[0]


def _attention_fwd(q, k, v):
  # With symbolic zeros, the primals say which gradients are needed.
  need_dq, need_dk, need_dv = (getattr(x, 'perturbed', True) for x in (q, k, v))
  q, k, v = (getattr(x, 'value', x) for x in (q, k, v))
  batch, n, heads, _ = q.shape
  out_shape = (batch, n, heads, v.shape[-1])
  out, lse = jax.ffi.ffi_call(FORWARD_TARGET, (
      jax.ShapeDtypeStruct(out_shape, jnp.float32),
      jax.ShapeDtypeStruct((batch, heads, n), jnp.float32)),
                              vmap_method='sequential')(q, k, v)
  return out, (q, k, v, out, lse, need_dq, need_dk or need_dv)


def _attention_bwd(residuals, g):
  q, k, v, out, lse, need_dq, need_dkv = residuals
  # The softmax's row sums sum_m dP * P, as sum_v dO * O (see attention.py).
  # (Not an einsum: XLA turns that into a reduction, and jaxpr and HLO FLOP
  # counts would disagree.)
  d = jnp.swapaxes(jnp.sum(g * out, axis=-1), 1, 2)
  # Gradients not needed come back as [0, 0, 0, 0] arrays, not computed.
  shapes = [x.shape if need else (0,) * 4
            for x, need in ((q, need_dq), (k, need_dkv), (v, need_dkv))]
  grads = jax.ffi.ffi_call(BACKWARD_TARGET, tuple(
      jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes),
                           vmap_method='sequential')(
                               q, k, v, g, lse, d, need_dq=need_dq,
                               need_dkv=need_dkv)
  dq, dk, dv = (grad if need else None for grad, need in zip(
      grads, (need_dq, need_dkv, need_dkv)))
  return dq, dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


def standardized_attention(q: jax.Array, features: jax.Array,
                           shared: jax.Array, mean: jax.Array,
                           inv_std: jax.Array) -> jax.Array:
  """One-head softmax(q x^T) x over standardised rows of a split byte array.

  x_bm = ([features_bm, shared_m] - mean_bm) * inv_std_bm is never held
  whole by the forward pass (see the module docstring).

  Args:
    q: [B, N, F + P] float32 queries, already scaled.
    features: [B, M, F] float32, the per-example channels.
    shared: [M, P] float32, the channels every example shares.
    mean: [B, M] float32, subtracted from every channel of a row.
    inv_std: [B, M] float32, multiplying every centred row.

  Returns:
    [B, N, F + P] float32, differentiable in every argument.

  Raises:
    ValueError: shapes that do not match, or other dtypes.
    native.BuildError: the kernels do not build.
  """
  args = (q, features, shared, mean, inv_std)
  if (q.ndim != 3 or features.ndim != 3 or shared.ndim != 2 or
      features.shape[0] != q.shape[0] or shared.shape[0] != features.shape[1]
      or q.shape[-1] != features.shape[-1] + shared.shape[-1] or
      mean.shape != features.shape[:2] or inv_std.shape != mean.shape):
    raise ValueError(
        'standardized_attention needs q [B, N, F + P], features [B, M, F], '
        'shared [M, P], mean and inv_std [B, M]; got '
        f'{", ".join(str(x.shape) for x in args)}.')
  dtypes = {x.dtype for x in args}
  if dtypes != {jnp.dtype(jnp.float32)}:
    raise ValueError('cpu_attention runs in float32; got '
                     f'{sorted(map(str, dtypes))}.')
  native.register()
  return _standardized(q[:, :, None], features, shared, mean,
                       inv_std)[:, :, 0]


@jax.custom_vjp
def _standardized(q, features, shared, mean, inv_std):
  return _standardized_fwd(q, features, shared, mean, inv_std)[0]


def _standardized_fwd(q, features, shared, mean, inv_std):
  need = [getattr(x, 'perturbed', True)
          for x in (q, features, shared, mean, inv_std)]
  q, features, shared, mean, inv_std = (
      getattr(x, 'value', x) for x in (q, features, shared, mean, inv_std))
  batch, n, _, width = q.shape
  out, lse = jax.ffi.ffi_call(STANDARDIZED_FORWARD_TARGET, (
      jax.ShapeDtypeStruct((batch, n, 1, width), jnp.float32),
      jax.ShapeDtypeStruct((batch, 1, n), jnp.float32)),
                              vmap_method='sequential')(
                                  q, features, shared, mean, inv_std)
  return out, (q, (features, shared, mean, inv_std), out, lse, need)


def _standardized_bwd(residuals, g):
  q, parts, out, lse, need = residuals
  need_dq, need_dparts = need[0], any(need[1:])
  d = jnp.swapaxes(jnp.sum(g * out, axis=-1), 1, 2)  # [B, 1, N]
  if not need_dparts:
    dq = jax.ffi.ffi_call(
        STANDARDIZED_BACKWARD_TARGET,
        jax.ShapeDtypeStruct(q.shape, jnp.float32),
        vmap_method='sequential')(q, *parts, g, lse, d) if need_dq else None
    return (dq,) + (None,) * len(parts)
  rows, rows_vjp = jax.vjp(byte_array.standardized_rows, *parts)  # [B, M, F + P]
  rows = rows[:, :, None]
  shapes = [x.shape if wanted else (0,) * 4
            for x, wanted in ((q, need_dq), (rows, need_dparts),
                              (rows, need_dparts))]
  dq, dk, dv = jax.ffi.ffi_call(BACKWARD_TARGET, tuple(
      jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes),
                                vmap_method='sequential')(
                                    q, rows, rows, g, lse, d, need_dq=need_dq,
                                    need_dkv=need_dparts)
  return (dq if need_dq else None, *rows_vjp((dk + dv)[:, :, 0]))


_standardized.defvjp(_standardized_fwd, _standardized_bwd,
                     symbolic_zeros=True)


def flops(target: str, q_shape, k_shape, v_shape, need_dq: bool = True,
          need_dkv: bool = True) -> int:
  """Matmul FLOPs (2 per multiply-add) of one call of a kernel, from its
  first three operands' shapes: forward q k^T and p v; backward q k^T
  again, g v^T, and the gradients asked for: dq = ds k, dk = ds^T q and
  dv = p^T g. For the standardised kernels, (q, features, shared): keys
  and values both F + P wide, and the backward computes dq alone."""
  batch, n, heads, depth = q_shape
  m, width = k_shape[1], v_shape[-1]
  per_product = 2 * batch * heads * n * m
  if target == STANDARDIZED_FORWARD_TARGET:
    return per_product * 2 * depth
  if target == STANDARDIZED_BACKWARD_TARGET:
    return per_product * 3 * depth
  if target == FORWARD_TARGET:
    return per_product * (depth + width)
  if target == BACKWARD_TARGET:
    return per_product * (depth + width + need_dq * depth +
                          need_dkv * (depth + width))
  raise ValueError(f'Not a cpu_attention target: {target!r}.')
