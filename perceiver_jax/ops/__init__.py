"""The ops the Perceiver is built from, and how each platform computes them.

Shape letters:
  B: batch size.           N: number of queries (latents or output queries).
  M: number of keys/values (byte array length, or latents in self-attention).
  H: number of heads.      K: qk channels per head.  V: v channels per head.
  C: channels of a [B, M, C] byte array.

The model calls `attention`, `attend_to_inputs`, `linear` and `layer_norm`
(and the pure `standardize`); this module is the only place that knows how
they are computed. `reference` implements them in plain jnp with JAX's own
gradients, and runs on every platform unless a backend registers a faster
implementation for it. Backends are imported here on first use and
register themselves: `tpu` (Pallas flash attention), `gpu` (cuDNN flash
attention, in processes that see CUDA devices) and the optional CPU
backend (`perceiver_jax.backends.cpu.backend`: OpenBLAS products and fused
attention, XLA FFI calls).

Which implementation runs is decided per lowering platform with
`jax.lax.platform_dependent`: a program traced once holds the CPU branch
and the reference branch, and lowering for a platform keeps only that
platform's. A program exported or compiled for 'tpu' or 'cuda' therefore
never holds a CPU kernel, on whichever host it was traced.

`use_backend(name)` (the model config's `backend`) chooses what may run:
  'auto' (default): registered backends on their platforms where they load
    (a CPU backend whose kernels do not build falls back to the reference,
    with one warning); the reference elsewhere.
  'reference': the reference on every platform.
  'cpu': as 'auto', but a CPU backend that does not load is an error.
"""

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import math
from typing import Any, Callable, Iterator, Mapping, Optional

from absl import logging
import jax

from perceiver_jax.ops import byte_array
from perceiver_jax.ops import reference

BACKENDS = ('auto', 'reference', 'cpu')
# Platform -> the module of its backend, imported on first use.
# A module may decline to register (ops/gpu.py without CUDA devices).
_BACKEND_MODULES = {'cpu': 'perceiver_jax.backends.cpu.backend',
                    'cuda': 'perceiver_jax.ops.gpu',
                    'tpu': 'perceiver_jax.ops.tpu'}


class BackendUnavailable(RuntimeError):
  """A backend that was asked for by name cannot run here."""


@dataclasses.dataclass(frozen=True)
class Backend:
  """One platform's implementation of the ops, with the reference's
  signatures (see `reference`).

  Each op may hand cases it does not cover back to the reference itself.
  `flop_rules` maps the FFI targets its programs call to functions of the
  jaxpr equation giving the call's matmul FLOPs (`perceiver_jax.analysis`).
  """
  attention: Callable[..., jax.Array]
  attend_to_inputs: Callable[..., jax.Array]
  linear: Callable[..., jax.Array]
  layer_norm: Callable[..., jax.Array]
  flop_rules: Mapping[str, Callable[[Any], int]] = dataclasses.field(
      default_factory=dict)


_registered: dict[str, Backend] = {}
_load_errors: dict[str, Exception] = {}
_backend = contextvars.ContextVar('perceiver_jax_ops_backend', default='auto')
_only_platform = contextvars.ContextVar('perceiver_jax_ops_platform',
                                        default=None)


def register(platform: str, backend: Backend) -> None:
  """Makes `backend` compute the ops on `platform` ('cpu', 'cuda', 'tpu')."""
  _registered[platform] = backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
  """Ops traced inside choose implementations as `name` says (see above)."""
  if name not in BACKENDS:
    raise ValueError(f'Unknown backend {name!r}; expected one of {BACKENDS}.')
  token = _backend.set(name)
  try:
    yield
  finally:
    _backend.reset(token)


def current_backend() -> str:
  """The backend name set by the innermost `use_backend` ('auto' if none)."""
  return _backend.get()


@contextlib.contextmanager
def tracing_for(platform: str) -> Iterator[None]:
  """Ops traced inside are `platform`'s implementations, called directly.

  For analyses of one platform's program (`perceiver_jax.analysis`): what
  its backward pass saves, or its FLOPs, without the other platforms'
  branches of `platform_dependent` in the jaxpr. Programs traced inside are
  meant for that platform only. `use_backend` still applies: 'reference'
  traces the reference.
  """
  if platform not in ('cpu', 'cuda', 'tpu'):
    raise ValueError(f'Unknown platform {platform!r}; expected cpu, cuda or '
                     'tpu.')
  token = _only_platform.set(platform)
  try:
    yield
  finally:
    _only_platform.reset(token)


def _load(platform: str) -> Optional[Backend]:
  """The registered backend of `platform`, importing it once if needed;
  None where it does not load (a warning once, or an error for a backend
  asked for by name)."""
  if platform not in _registered and platform not in _load_errors:
    try:
      importlib.import_module(_BACKEND_MODULES[platform])
    except Exception as e:  # pylint: disable=broad-except
      _load_errors[platform] = e
      logging.warning('The %s backend is unavailable, using the reference '
                      'ops there: %s', platform, e)
  if platform in _load_errors and current_backend() == platform:
    raise BackendUnavailable(
        f'backend {platform!r} was asked for but does not load: '
        f'{_load_errors[platform]}') from _load_errors[platform]
  return _registered.get(platform)


def _platform_backends() -> dict[str, Backend]:
  """platform -> Backend for the ops traced now."""
  name = current_backend()
  if name == 'reference':
    return {}
  backends = {}
  for platform in _BACKEND_MODULES:
    backend = _load(platform)
    if backend is not None:
      backends[platform] = backend
  for platform, backend in _registered.items():
    backends.setdefault(platform, backend)
  return backends


def _dispatch(op: str, *args: Any, **static: Any) -> jax.Array:
  """Calls op per lowering platform: registered backends, else reference.

  Arrays go through `platform_dependent`; `static` (Python values) is bound
  to every branch.
  """
  only = _only_platform.get()
  if only is not None:
    backend = None if current_backend() == 'reference' else _load(only)
    return getattr(backend or reference, op)(*args, **static)
  branches = {platform: functools.partial(getattr(backend, op), **static)
              for platform, backend in _platform_backends().items()}
  default = functools.partial(getattr(reference, op), **static)
  if not branches:
    return default(*args)
  return jax.lax.platform_dependent(*args, default=default, **branches)


def flop_rules() -> dict[str, Callable[[Any], int]]:
  """FFI target -> FLOP rule, over every registered backend."""
  rules = {}
  for backend in _registered.values():
    rules.update(backend.flop_rules)
  return rules


def check_mask(mask: jax.Array, batch: int, n: int, m: int) -> jax.Array:
  """A [B, M] or [B, N, M] mask as a boolean [B', 1, N', M].

  Raises:
    ValueError: another rank, or sizes that do not match B, N, M.
  """
  if mask.ndim == 2:  # [B, M]: which keys are real.
    mask = mask[:, None, None, :]
  elif mask.ndim == 3:  # [B, N, M]
    mask = mask[:, None, :, :]
  else:
    raise ValueError(
        f'mask must be [B, M] or [B, N, M], got shape {mask.shape}.')
  if (mask.shape[0] not in (1, batch) or mask.shape[2] not in (1, n) or
      mask.shape[3] != m):
    raise ValueError(
        f'mask of shape {mask.shape} does not match B={batch}, N={n}, M={m}.')
  return mask.astype(bool)


def _check_chunk_size(chunk_size: Optional[int]) -> None:
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f'chunk_size must be >= 1, got {chunk_size}.')


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              mask: Optional[jax.Array] = None, *,
              scale: Optional[float] = None,
              chunk_size: Optional[int] = None) -> jax.Array:
  """Multi-head scaled dot-product attention, softmax(q k^T * scale) v.

  Logits are normalised in float32 whatever the compute dtype. Queries
  whose keys are all masked attend to nothing and return zeros.

  Args:
    q: [B, N, H, K] queries.
    k: [B, M, H, K] keys.
    v: [B, M, H, V] values.
    mask: optional boolean [B, M] (True = real key) or [B, N, M].
    scale: logit scale; 1/sqrt(K) if None.
    chunk_size: if set and < M, the keys may be processed in chunks of this
      size with an online softmax: memory O(N c) instead of O(N M), the
      same result. A backend whose kernel works in tiles of its own may
      ignore it.

  Returns:
    [B, N, H, V] attended values, in the dtype of v.

  Raises:
    ValueError: shapes that do not fit together, a bad mask or chunk size.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError('q, k, v must be [B, N|M, H, K|V]; got shapes '
                     f'{q.shape}, {k.shape}, {v.shape}.')
  batch, n, heads, qk = q.shape
  m = k.shape[1]
  if k.shape[2:] != (heads, qk) or v.shape[1:3] != (m, heads):
    raise ValueError(f'Incompatible q {q.shape}, k {k.shape}, v {v.shape}.')
  _check_chunk_size(chunk_size)
  if mask is not None:
    mask = check_mask(mask, batch, n, m)
  scale = 1.0 / math.sqrt(qk) if scale is None else scale
  return _dispatch('attention', q, k, v, mask, scale=scale,
                   chunk_size=chunk_size)


def attend_to_inputs(q: jax.Array, inputs: byte_array.ByteArray,
                     mask: Optional[jax.Array] = None, *, scale: float,
                     chunk_size: Optional[int] = None) -> jax.Array:
  """One-head attention whose keys and values are both the inputs x.

  softmax(q x^T * scale) x, for the reformulated cross-attention
  (`modules.attention`). The inputs may be held in parts
  (`byte_array.SplitByteArray`, or its `StandardizedByteArray`): a backend
  may read their rows without building the [B, M, C] array.

  Args:
    q: [B, N, C] queries in the inputs' channels.
    inputs: [B, M, C] byte array, dense or in parts.
    mask: optional boolean [B, M] or [B, N, M].
    scale: logit scale.
    chunk_size: as for `attention`.

  Returns:
    [B, N, C].
  """
  if q.ndim != 3 or len(inputs.shape) != 3 or (
      q.shape[0], q.shape[2]) != (inputs.shape[0], inputs.shape[2]):
    raise ValueError('attend_to_inputs needs q [B, N, C] and inputs '
                     f'[B, M, C]; got {q.shape} and {inputs.shape}.')
  _check_chunk_size(chunk_size)
  if mask is not None:
    mask = check_mask(mask, q.shape[0], q.shape[1], inputs.shape[1])
  return _dispatch('attend_to_inputs', q, inputs, mask, scale=scale,
                   chunk_size=chunk_size)


def linear(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """x W + b for x [..., C_in], W [C_in, C_out], b [C_out]."""
  return _dispatch('linear', x, w, b)


def layer_norm(x: jax.Array, scale: jax.Array, offset: jax.Array,
               eps: float) -> jax.Array:
  """LayerNorm over the last axis: (x - mean) / std * scale + offset."""
  return _dispatch('layer_norm', x, scale, offset, eps=eps)


def standardize(x: byte_array.ByteArray,
                eps: float) -> byte_array.ByteArray:
  """(x - mean) / sqrt(var + eps) over the channels of a [B, M, C] x.

  A dense x gives a dense array; a `SplitByteArray` gives its
  `StandardizedByteArray` (statistics [B, M] only, nothing of [B, M, C]).
  """
  if isinstance(x, byte_array.SplitByteArray):
    return byte_array.standardize(x, eps)
  return reference.standardize(x, eps)[0]
