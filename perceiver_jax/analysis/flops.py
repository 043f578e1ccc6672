"""Analytic FLOP counts from a function's jaxpr, without running it.

FLOPs are counted as in P1 App. B: 2 per multiply-add of every matrix
product (dot_general, convolutions and the FFI calls of a backend, whose
rules `perceiver_jax.ops.flop_rules` gives); elementwise ops (softmax,
GELU, LayerNorm) are not counted. Because the count walks the jaxpr that
JAX actually traces, it measures the formulation that runs: a reformulated
attention shows up as fewer FLOPs, a backward pass as its own products.

The ops trace one branch per platform (`jax.lax.platform_dependent`); the
count follows the branches of one platform, as the program lowered for it
would run.
"""

from typing import Any, Callable, Optional

import jax
import jax.extend  # Not imported by `import jax`; used for jaxpr types.
import numpy as np

from perceiver_jax import ops


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


def _platform_branch(eqn, platform: str) -> int:
  """The branch a platform_index equation selects for `platform`."""
  default = None
  for index, platforms in enumerate(eqn.params['platforms']):
    if platforms is None:  # The default branch.
      default = index
    elif platform in platforms:
      return index
  if default is None:
    raise ValueError(f'The program has no branch for platform {platform!r}.')
  return default


def jaxpr_flops(jaxpr, platform: str = 'cpu') -> int:
  """Matmul FLOPs of a (closed) jaxpr on `platform`, into sub-jaxprs."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  rules = ops.flop_rules()
  branch_of = {}  # platform_index output -> the branch it selects.
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'platform_index':
      branch_of[eqn.outvars[0]] = _platform_branch(eqn, platform)
    elif name == 'cond' and eqn.invars[0] in branch_of:
      branch = eqn.params['branches'][branch_of[eqn.invars[0]]]
      total += jaxpr_flops(branch, platform)
    elif name == 'dot_general':
      total += _dot_general_flops(eqn)
    elif name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif name == 'ffi_call' and eqn.params['target_name'] in rules:
      total += rules[eqn.params['target_name']](eqn)
    else:
      # Loops multiply their body's count by the trip count.
      trips = eqn.params.get('length', 1) if name == 'scan' else 1
      total += trips * sum(jaxpr_flops(sub, platform)
                           for sub in _subjaxprs(eqn))
  return total


def count_flops(fn: Callable[..., Any], *args: Any,
                platform: Optional[str] = None, **kwargs: Any) -> int:
  """Matmul FLOPs of `fn(*args, **kwargs)`; args may be ShapeDtypeStructs.

  Args:
    fn: the function to count.
    *args: its positional arguments.
    platform: the platform whose ops are counted ('cpu', 'cuda', 'tpu');
      default the platform of JAX's default backend.
    **kwargs: its keyword arguments.
  """
  if platform is None:
    platform = jax.devices()[0].platform
    platform = 'cuda' if platform == 'gpu' else platform
  return jaxpr_flops(jax.make_jaxpr(fn, static_argnums=())(*args, **kwargs),
                     platform)
