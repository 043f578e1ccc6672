"""Batched float32 matrix products on CPU through OpenBLAS (an XLA FFI call).

XLA:CPU (jaxlib 0.10) runs batched products of small matrices, such as
self-attention's per-head q k^T over N = 128 latents, at about one core's
worth of throughput. `csrc/cpu_matmul.cc` runs each product with
OpenBLAS's single-threaded sgemm and shares the products out over XLA's
intra-op threads (docs/cpu_backend.md).

`matmul(a, b, transpose_a=, transpose_b=)` computes op(a) op(b) over leading
batch axes through the kernel for float32 operands (XLA otherwise), and
`einsum(subscripts, a, b)` is jnp.einsum that takes the kernel where the
equation is such a product. Both are differentiable; the gradients are
again kernel products. Only the CPU backend calls them, on CPU.
"""

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from perceiver_jax.backends.cpu import native

TARGET = 'perceiver_jax_cpu_matmul'
# How a call of the kernel reads in compiled HLO text.
HLO_CALL = f'custom_call_target="{TARGET}"'


def matmul(a: jax.Array, b: jax.Array, *, transpose_a: bool = False,
           transpose_b: bool = False) -> jax.Array:
  """op(a) op(b) for every index of the leading (batch) axes.

  Args:
    a: [..., M, K], or [..., K, M] if transpose_a.
    b: [..., K, N], or [..., N, K] if transpose_b; batch axes broadcast
      against a's.
    transpose_a: use a^T (its last two axes swapped; no copy is made).
    transpose_b: use b^T.

  Returns:
    [..., M, N], differentiable either way.

  Raises:
    ValueError: an operand of rank < 2, or contracted sizes that differ.
    native.BuildError: the kernel does not build.
  """
  if a.ndim < 2 or b.ndim < 2:
    raise ValueError(f'matmul needs operands of rank >= 2, got shapes '
                     f'{a.shape} and {b.shape}.')
  k_a = a.shape[-2] if transpose_a else a.shape[-1]
  k_b = b.shape[-1] if transpose_b else b.shape[-2]
  if k_a != k_b:
    raise ValueError(
        f'matmul of {a.shape} (transpose_a={transpose_a}) and {b.shape} '
        f'(transpose_b={transpose_b}): contracted sizes {k_a} != {k_b}.')
  if not (a.dtype == jnp.float32 and b.dtype == jnp.float32):
    return jnp.einsum(f'...{"km" if transpose_a else "mk"},'
                      f'...{"nk" if transpose_b else "kn"}->...mn', a, b)
  native.register()
  batch = jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
  a = jnp.broadcast_to(a, batch + a.shape[-2:])
  b = jnp.broadcast_to(b, batch + b.shape[-2:])
  return _blas_matmul(a, b, transpose_a, transpose_b)


def einsum(subscripts: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """jnp.einsum(subscripts, a, b), through the kernel where it can be.

  The kernel takes equations that are one batched matrix product: the same
  batch axes lead both operands and the output, followed by two axes each,
  one contracted ('...nk,...mk->...nm', 'bnc,bcv->bnv', 'km,kn->mn'); other
  equations and other dtypes go to XLA.
  """
  plan = _matmul_plan(subscripts)
  if plan is None:
    return jnp.einsum(subscripts, a, b)
  swap, transpose_a, transpose_b = plan
  if swap:  # The output is [..., free axis of b, free axis of a].
    a, b = b, a
  return matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


@functools.lru_cache(maxsize=None)
def _matmul_plan(subscripts: str) -> Optional[tuple[bool, bool, bool]]:
  """(swap operands, transpose_a, transpose_b) of a batched-matmul einsum,
  or None if the equation is not one."""
  inputs, _, out = subscripts.replace(' ', '').partition('->')
  specs = inputs.split(',') + [out]
  if len(specs) != 3 or min(len(spec) for spec in specs) < 2:
    return None
  batch = {spec[:-2] for spec in specs}
  a, b, c = (spec[-2:] for spec in specs)
  if len(batch) != 1 or len(set(a + b + c)) != 3 or (
      set(a + b) & set(batch.pop())):
    return None
  for swap, (x, y) in ((False, (a, b)), (True, (b, a))):
    contracted = set(x) & set(y)
    if len(contracted) == 1 and contracted.isdisjoint(c) and (
        set(x) | set(y)) - contracted == set(c) and c[0] in x:
      return swap, x[0] in contracted, y[1] in contracted
  return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _blas_matmul(a, b, transpose_a, transpose_b):
  """The kernel's product; a and b have the same batch axes."""
  m = a.shape[-1] if transpose_a else a.shape[-2]
  n = b.shape[-2] if transpose_b else b.shape[-1]
  out = jax.ShapeDtypeStruct(a.shape[:-2] + (m, n), jnp.float32)
  call = jax.ffi.ffi_call(TARGET, out, vmap_method='broadcast_all')
  return call(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def _blas_matmul_fwd(a, b, transpose_a, transpose_b):
  return _blas_matmul(a, b, transpose_a, transpose_b), (a, b)


def _blas_matmul_bwd(transpose_a, transpose_b, residuals, g):
  # c = A B with A = op(a), B = op(b): dA = g B^T, dB = A^T g, and
  # d(x^T) = (dx)^T, each again one product with transposed operands.
  a, b = residuals
  da = (_blas_matmul(b, g, transpose_b, True) if transpose_a else
        _blas_matmul(g, b, False, not transpose_b))
  db = (_blas_matmul(g, a, True, transpose_a) if transpose_b else
        _blas_matmul(a, g, not transpose_a, False))
  return da, db


_blas_matmul.defvjp(_blas_matmul_fwd, _blas_matmul_bwd)


def flops(eqn) -> int:
  """Matmul FLOPs (2 per multiply-add) of one of the kernel's jaxpr calls."""
  a = eqn.invars[0].aval.shape
  transpose_a = dict(eqn.params['attributes'])['transpose_a']
  k = a[-2] if transpose_a else a[-1]
  return 2 * math.prod(eqn.params['result_avals'][0].shape) * k

