"""Gradients written out for XLA:CPU, and the products they call.

The functions here compute what `perceiver_jax.ops.reference` computes, to
float32 rounding, with hand-written VJPs that XLA:CPU compiles into faster
programs (docs/cpu_backend.md has the measurements):
  layer_norm: the LayerNorm gradient in closed form.
  linear: weight gradients as x^T g through OpenBLAS, with the activation x
    (stored by the forward pass) as the transposed operand.
  attend: softmax attention with its products through OpenBLAS, logits
    optionally keys-major, and the softmax's row sums from the outputs.
Gradients with respect to inputs that need none (data, constants) are
skipped (symbolic zeros), so they are neither run nor counted in FLOPs.
Other platforms use JAX's own gradients of the reference.
"""

import functools

import jax
import jax.numpy as jnp

from perceiver_jax.backends.cpu import matmul
from perceiver_jax.ops import reference


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, offset, eps):
  """LayerNorm over the last axis, with its gradient written out: XLA:CPU
  runs it faster than JAX's own (docs/cpu_backend.md)."""
  return reference.standardize(x, eps)[0] * scale + offset


def _layer_norm_fwd(x, scale, offset, eps):
  normalized, inv_std = reference.standardize(x, eps)
  # An empty array carries offset's dtype to the backward pass.
  return normalized * scale + offset, (normalized, inv_std, scale,
                                       jnp.zeros((0,), offset.dtype))


def _layer_norm_bwd(eps, residuals, g):
  del eps
  normalized, inv_std, scale, offset_dtype = residuals
  g_scaled = g * scale
  dx = inv_std * (g_scaled - jnp.mean(g_scaled, axis=-1, keepdims=True)
                  - normalized * jnp.mean(g_scaled * normalized, axis=-1,
                                          keepdims=True))
  batch_axes = tuple(range(g.ndim - 1))
  # Each gradient in its primal's dtype, as JAX's own would be (mixed
  # precision mixes them).
  return (dx.astype(normalized.dtype),
          jnp.sum(g * normalized, axis=batch_axes).astype(scale.dtype),
          jnp.sum(g, axis=batch_axes).astype(offset_dtype.dtype))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def attend(q, k, v, mask, scale, keys_major):
  """softmax(q k^T scale) v for q [..., N, K], k [..., M, K], v [..., M, V]
  and a mask broadcastable to [..., N, M] (or None); the leading axes are
  [B, H] (head-first) or [B] (one head). Queries with no real key give 0.

  The scale is applied to q (N x K numbers, not N x M logits). The backward
  pass takes the softmax's row sums sum_m(dP * P) as sum_v(dO * O), over V
  channels instead of M keys (as FlashAttention does): the same number,
  without a reduction over the [..., N, M] array.

  keys_major holds the logits and weights as [..., M, N] instead: same
  result, faster for the one-head cross-attention on XLA:CPU, whose
  products then read both operands contiguously (docs/cpu_backend.md).

  The products run through OpenBLAS (`matmul.einsum`) in float32.
  """
  return _attend_fwd(q, k, v, mask, scale, keys_major)[0]


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
  (tests/backends/cpu/test_gradients.py fails with it).
  """
  return q + 0.0 * k[..., :1, :1]


def _attend_fwd(q, k, v, mask, scale, keys_major):
  einsum = matmul.einsum
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


def _attend_bwd(scale, keys_major, residuals, g):
  einsum = matmul.einsum
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


attend.defvjp(_attend_fwd, _attend_bwd, symbolic_zeros=True)


@jax.custom_vjp
def linear(x, w, b):
  """x W + b, whose weight gradient runs through OpenBLAS (see below)."""
  return jnp.dot(x, w) + b


# The gradients of `linear` and `_attend` are written out so that XLA:CPU
# gets weight gradients as x^T g with the activation x (stored by the forward
# pass) as the transposed operand, rather than the output gradient g, whose
# transposed copy XLA fuses with the whole chain of residual-stream gradients
# above it (recomputed once per layer: quadratic in depth). Gradients with
# respect to inputs that need none (data, constants) are skipped, so they are
# neither run nor counted in FLOPs.


def _linear_fwd(x, w, b):
  # Residuals hold None where no gradient is needed (symbolic zeros).
  out = jnp.dot(x.value, w.value) + b.value
  return out, (w.value if x.perturbed else None,
               x.value if w.perturbed else None)


def _linear_bwd(residuals, g):
  w_for_dx, x_for_dw = residuals
  g2 = g.reshape(-1, g.shape[-1])
  dx = None if w_for_dx is None else jnp.dot(g, w_for_dx.T)
  dw = None if x_for_dw is None else matmul.einsum(
      'ri,ro->io', x_for_dw.reshape(-1, x_for_dw.shape[-1]), g2)
  return dx, dw, jnp.sum(g2, axis=0)  # db: cheap, dropped by XLA if unused.


linear.defvjp(_linear_fwd, _linear_bwd, symbolic_zeros=True)
