"""Analytic FLOP counts from a function's jaxpr, without running it.

FLOPs are counted as in P1 App. B: 2 per multiply-add of every matrix
product (dot_general, convolutions and the matrix products of our own
kernels, perceiver_jax.kernels); elementwise ops (softmax, GELU,
LayerNorm) are not counted. Because the count walks the jaxpr that JAX
actually traces, it measures the formulation that runs: a reformulated
attention shows up as fewer FLOPs, a backward pass as its own products.
"""

from typing import Any, Callable

import jax
import jax.extend  # Not imported by `import jax`; used for jaxpr types.
import numpy as np

from perceiver_jax.kernels import cpu_attention
from perceiver_jax.kernels import cpu_matmul


def _dot_general_flops(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (lhs_contract, rhs_contract), (lhs_batch, _) = (
      eqn.params['dimension_numbers'])
  contract = int(np.prod([lhs[d] for d in lhs_contract]))
  batch = int(np.prod([lhs[d] for d in lhs_batch]))
  lhs_free = int(np.prod([s for d, s in enumerate(lhs)
                          if d not in lhs_contract and d not in lhs_batch]))
  rhs_batch = eqn.params['dimension_numbers'][1][1]
  rhs_free = int(np.prod([s for d, s in enumerate(rhs)
                          if d not in rhs_contract and d not in rhs_batch]))
  return 2 * batch * lhs_free * rhs_free * contract


def _conv_flops(eqn) -> int:
  out = eqn.outvars[0].aval.shape
  rhs = eqn.invars[1].aval.shape
  dn = eqn.params['dimension_numbers']
  out_spec = dn.out_spec  # (batch, feature, spatial...)
  rhs_spec = dn.rhs_spec  # (out feature, in feature, spatial...)
  kernel_spatial = int(np.prod([rhs[d] for d in rhs_spec[2:]]))
  in_features = rhs[rhs_spec[1]]
  out_elems = int(np.prod(out))
  del out_spec
  return 2 * out_elems * kernel_spatial * in_features


def _subjaxprs(eqn):
  for param in eqn.params.values():
    for p in (param if isinstance(param, (list, tuple)) else [param]):
      if isinstance(p, jax.extend.core.ClosedJaxpr):
        yield p.jaxpr
      elif isinstance(p, jax.extend.core.Jaxpr):
        yield p


def jaxpr_flops(jaxpr) -> int:
  """Matmul FLOPs of a (closed) jaxpr, recursing into sub-jaxprs."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      total += _dot_general_flops(eqn)
    elif name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif name == 'ffi_call' and eqn.params['target_name'] == cpu_matmul.TARGET:
      total += cpu_matmul.flops(eqn)
    elif name == 'ffi_call' and (
        eqn.params['target_name'] in cpu_attention.TARGETS):
      total += cpu_attention.flops(eqn.params['target_name'],
                                   *(v.aval.shape for v in eqn.invars[:3]),
                                   **dict(eqn.params['attributes']))
    else:
      # Loops multiply their body's count by the trip count.
      trips = eqn.params.get('length', 1) if name == 'scan' else 1
      total += trips * sum(jaxpr_flops(sub) for sub in _subjaxprs(eqn))
  return total


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
  """Matmul FLOPs of `fn(*args, **kwargs)`; args may be ShapeDtypeStructs."""
  return jaxpr_flops(jax.make_jaxpr(fn, static_argnums=())(*args, **kwargs))
