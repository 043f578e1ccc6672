"""Batched float32 matrix products on CPU through OpenBLAS (an XLA FFI call).

XLA:CPU (jaxlib 0.10) runs batched products of small matrices, such as
self-attention's per-head q k^T over N = 128 latents, at 40-50 GFLOP/s on the
project's 2-core machine: about one core's worth. `cpu_matmul.cc` runs each
product with OpenBLAS's single-threaded sgemm and shares the products out
over XLA's intra-op threads (README, Performance, for the measurements).

`matmul(a, b, transpose_a=, transpose_b=, use_blas=)` computes op(a) op(b)
over leading batch axes, through the kernel or through XLA: the same numbers
up to float32 rounding; `einsum(subscripts, a, b, use_blas=)` is jnp.einsum
that takes the kernel where the equation is such a product. Callers decide
with `enabled()`, which reads the backend set by the innermost
`backend(name)` context:
  'auto' (default): the kernel when JAX's default backend is the CPU and the
    kernel builds; XLA otherwise (with one warning if the build failed).
  'blas': as 'auto', but a failed build raises `BuildError`.
  'xla': never the kernel.
A caller resolves `enabled()` in its forward pass and hands the answer to its
hand-written backward pass, which JAX traces later, outside the context. The
choice is made while tracing: a function jit has traced and cached already
keeps the products it was traced with.

This module also builds and loads the library that holds all of
perceiver_jax's CPU kernels: this product and the fused attention of
`cpu_attention` (which the same backend switches on and off). It is compiled
on first use with the C++ compiler ($CXX, else c++) against jaxlib's FFI
headers and the scipy-openblas32 wheel's OpenBLAS, into $PERCEIVER_JAX_CACHE
(default ~/.cache/perceiver_jax)/kernels/, one file per hash of the sources,
headers, toolchain and CPU. It is written under a temporary name and renamed,
so processes building at once never load a partial file.
"""

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import math
import os
import pathlib
import platform
import subprocess
import tempfile
from typing import Iterator, Optional

from absl import logging
import jax
import jax.numpy as jnp

TARGET = 'perceiver_jax_cpu_matmul'
# How a call of the kernel reads in compiled HLO text.
HLO_CALL = f'custom_call_target="{TARGET}"'
BACKENDS = ('auto', 'blas', 'xla')
# The library holds all of perceiver_jax's CPU kernels: FFI target -> the
# handler symbol exported by one of the sources.
_HERE = pathlib.Path(__file__).parent
_SOURCES = (_HERE / 'cpu_matmul.cc', _HERE / 'cpu_attention.cc')
_HEADERS = (_HERE / 'parallel.h',)
_HANDLERS = {
    TARGET: 'PerceiverJaxCpuMatmul',
    'perceiver_jax_cpu_attention_fwd': 'PerceiverJaxCpuAttentionFwd',
    'perceiver_jax_cpu_attention_bwd': 'PerceiverJaxCpuAttentionBwd',
    'perceiver_jax_cpu_attention_standardized_fwd':
        'PerceiverJaxCpuAttentionStandardizedFwd',
    'perceiver_jax_cpu_attention_standardized_bwd':
        'PerceiverJaxCpuAttentionStandardizedBwd',
}

_backend = contextvars.ContextVar('perceiver_jax_cpu_matmul', default='auto')
# The outcome of the one build attempt per process: the loaded library, or
# the BuildError that stopped it.
_built: dict[str, object] = {}


class BuildError(RuntimeError):
  """The kernel could not be compiled or loaded."""


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
  """Products traced inside use backend `name` ('auto', 'blas' or 'xla')."""
  if name not in BACKENDS:
    raise ValueError(
        f'Unknown matmul backend {name!r}; expected one of {BACKENDS}.')
  token = _backend.set(name)
  try:
    yield
  finally:
    _backend.reset(token)


def enabled() -> bool:
  """Whether products traced now should run through the kernel.

  Raises:
    BuildError: backend 'blas' on CPU and the kernel does not build.
  """
  name = _backend.get()
  if name == 'xla' or jax.default_backend() != 'cpu':
    return False
  try:
    register()
  except BuildError as e:
    if name == 'blas':
      raise
    if not _built.get('warned'):
      _built['warned'] = True
      logging.warning('CPU matmul kernel unavailable, using XLA: %s', e)
    return False
  return True


def matmul(a: jax.Array, b: jax.Array, *, transpose_a: bool = False,
           transpose_b: bool = False, use_blas: bool = False) -> jax.Array:
  """op(a) op(b) for every index of the leading (batch) axes.

  Args:
    a: [..., M, K], or [..., K, M] if transpose_a.
    b: [..., K, N], or [..., N, K] if transpose_b; batch axes broadcast
      against a's.
    transpose_a: use a^T (its last two axes swapped; no copy is made).
    transpose_b: use b^T.
    use_blas: run the product through the kernel (see `enabled`) where both
      operands are float32; XLA otherwise.

  Returns:
    [..., M, N], differentiable either way.

  Raises:
    ValueError: an operand of rank < 2, or contracted sizes that differ.
    BuildError: use_blas and the kernel does not build.
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
  if not (use_blas and a.dtype == jnp.float32 and b.dtype == jnp.float32):
    return jnp.einsum(f'...{"km" if transpose_a else "mk"},'
                      f'...{"nk" if transpose_b else "kn"}->...mn', a, b)
  register()
  batch = jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
  a = jnp.broadcast_to(a, batch + a.shape[-2:])
  b = jnp.broadcast_to(b, batch + b.shape[-2:])
  return _blas_matmul(a, b, transpose_a, transpose_b)


def einsum(subscripts: str, a: jax.Array, b: jax.Array, *,
           use_blas: bool = False) -> jax.Array:
  """jnp.einsum(subscripts, a, b), through the kernel where it can be.

  The kernel takes equations that are one batched matrix product: the same
  batch axes lead both operands and the output, followed by two axes each,
  one contracted ('...nk,...mk->...nm', 'bnc,bcv->bnv', 'km,kn->mn'); other
  equations, other dtypes or use_blas=False go to XLA.
  """
  plan = _matmul_plan(subscripts) if use_blas else None
  if plan is None:
    return jnp.einsum(subscripts, a, b)
  swap, transpose_a, transpose_b = plan
  if swap:  # The output is [..., free axis of b, free axis of a].
    a, b = b, a
  return matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b,
                use_blas=True)


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


def register() -> None:
  """Builds, loads and registers the CPU kernels once per process.

  Raises:
    BuildError: the library does not build or load (also on later calls).
  """
  if 'error' in _built:
    raise _built['error']
  if 'library' in _built:
    return
  try:
    library = load()
    for target, handler in _HANDLERS.items():
      jax.ffi.register_ffi_target(
          target, jax.ffi.pycapsule(getattr(library, handler)),
          platform='cpu')
  except (BuildError, OSError, AttributeError) as e:
    error = e if isinstance(e, BuildError) else BuildError(str(e))
    _built['error'] = error
    raise error from e
  _built['library'] = library


def _cpu_identity() -> str:
  """What -march=native compiles for: the CPU's model and feature flags."""
  try:
    with open('/proc/cpuinfo') as f:
      lines = [line for line in f if line.startswith(('model name', 'flags'))]
    return ''.join(sorted(set(lines)))
  except OSError:
    return f'{platform.machine()} {platform.processor()}'


def load(cache_dir: Optional[str] = None) -> ctypes.CDLL:
  """The kernel's shared library, built (see `build`) and loaded.

  A cached file that does not load (cut short by a full disk, or copied from
  another machine) is deleted and built again, once.

  Raises:
    BuildError: the kernel cannot be built, or the rebuilt file not loaded.
  """
  path = build(cache_dir)
  try:
    return ctypes.CDLL(str(path))
  except OSError as e:
    logging.warning('Rebuilding %s, which does not load: %s', path, e)
    try:
      path.unlink(missing_ok=True)
    except OSError as unlink_error:
      raise BuildError(f'{path} does not load ({e}) and cannot be removed '
                       f'({unlink_error}).') from unlink_error
  path = build(cache_dir)
  try:
    return ctypes.CDLL(str(path))
  except OSError as e:
    raise BuildError(f'{path} was built but does not load: {e}') from e


def build(cache_dir: Optional[str] = None,
          compiler: Optional[str] = None) -> pathlib.Path:
  """Compiles the kernel (unless cached); returns the shared library's path.

  Args:
    cache_dir: where compiled kernels live; default $PERCEIVER_JAX_CACHE or
      ~/.cache/perceiver_jax, plus /kernels.
    compiler: the C++ compiler; default $CXX, else c++.

  Raises:
    BuildError: no OpenBLAS wheel, an unwritable cache, no compiler, or the
      compilation failed (the compiler's messages included).
  """
  try:
    import scipy_openblas32  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise BuildError('the scipy-openblas32 package is not installed '
                     '(pip install scipy-openblas32).') from e
  compiler = compiler or os.environ.get('CXX', 'c++')
  ffi_include = jax.ffi.include_dir()
  blas_include = scipy_openblas32.get_include_dir()
  blas_lib = scipy_openblas32.get_lib_dir()
  key = hashlib.sha256()
  for part in (compiler, ffi_include, blas_include, blas_lib, _cpu_identity()):
    key.update(part.encode() + b'\0')
  for source in _SOURCES + _HEADERS:
    key.update(source.read_bytes())
  for header in sorted(pathlib.Path(ffi_include, 'xla', 'ffi', 'api').glob(
      '*.h')):
    key.update(header.read_bytes())
  if cache_dir is None:
    cache_dir = os.environ.get('PERCEIVER_JAX_CACHE') or os.path.join(
        os.path.expanduser('~'), '.cache', 'perceiver_jax')
  out_dir = pathlib.Path(cache_dir, 'kernels')
  path = out_dir / f'cpu_matmul-{key.hexdigest()[:16]}.so'
  if path.exists():
    return path
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=out_dir, suffix='.so.partial')
  except OSError as e:
    raise BuildError(f'cannot write to {out_dir} ({e}); set '
                     'PERCEIVER_JAX_CACHE to a writable folder.') from e
  os.close(fd)
  # -march=native: the attention kernel's exponentials run 1.6x faster with
  # this machine's vector instructions (AVX-512 here) than with the x86-64
  # baseline's SSE2; the cache key names the CPU, so a cache shared by
  # different machines holds one build for each.
  command = [compiler, '-O3', '-march=native', '-fopenmp-simd', '-std=c++17',
             '-shared', '-fPIC', '-isystem', ffi_include, '-isystem',
             blas_include, *map(str, _SOURCES), '-o', partial, '-L', blas_lib, '-lscipy_openblas',
             f'-Wl,-rpath,{blas_lib}']
  try:
    result = subprocess.run(command, capture_output=True, text=True,
                            timeout=600, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    os.unlink(partial)
    raise BuildError(f'{" ".join(command)} did not run: {e}') from e
  if result.returncode != 0:
    os.unlink(partial)
    raise BuildError(f'{" ".join(command)} failed '
                     f'(exit {result.returncode}):\n{result.stderr[-3000:]}')
  os.replace(partial, path)
  return path
