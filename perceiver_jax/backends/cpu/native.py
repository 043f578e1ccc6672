"""Builds, caches and loads the CPU backend's shared library (XLA FFI).

The library holds every CPU kernel of perceiver_jax: the batched products
of `matmul` and the fused attention of `attention` (sources in csrc/). It is
compiled on first use with the C++ compiler ($CXX, else c++) against
jaxlib's FFI headers and the scipy-openblas32 wheel's OpenBLAS, into
$PERCEIVER_JAX_CACHE (default ~/.cache/perceiver_jax)/kernels/, one file
per hash of the sources, headers, toolchain and CPU. It is written under a
temporary name and renamed, so processes building at once never load a
partial file.
"""

import ctypes
import hashlib
import os
import pathlib
import platform
import subprocess
import tempfile
from typing import Optional

from absl import logging
import jax

_CSRC = pathlib.Path(__file__).parent / 'csrc'
_SOURCES = (_CSRC / 'cpu_matmul.cc', _CSRC / 'cpu_attention.cc')
_HEADERS = (_CSRC / 'parallel.h',)
# FFI target -> the handler symbol exported by one of the sources.
HANDLERS = {
    'perceiver_jax_cpu_matmul': 'PerceiverJaxCpuMatmul',
    'perceiver_jax_cpu_attention_fwd': 'PerceiverJaxCpuAttentionFwd',
    'perceiver_jax_cpu_attention_bwd': 'PerceiverJaxCpuAttentionBwd',
    'perceiver_jax_cpu_attention_standardized_fwd':
        'PerceiverJaxCpuAttentionStandardizedFwd',
    'perceiver_jax_cpu_attention_standardized_bwd':
        'PerceiverJaxCpuAttentionStandardizedBwd',
}

# The outcome of the one build attempt per process: the loaded library, or
# the BuildError that stopped it.
_built: dict[str, object] = {}


class BuildError(RuntimeError):
  """The kernels could not be compiled or loaded."""


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
    for target, handler in HANDLERS.items():
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
  # -march=native: the attention kernel's exponentials vectorise with the
  # machine's own instructions (AVX-512 where present) rather than the
  # x86-64 baseline's SSE2 (docs/cpu_backend.md); the cache key names the
  # CPU, so a cache shared by different machines holds one build for each.
  command = [compiler, '-O3', '-march=native', '-fopenmp-simd', '-std=c++17',
             '-shared', '-fPIC', '-isystem', ffi_include, '-isystem',
             blas_include, *map(str, _SOURCES), '-o', partial, '-L', blas_lib,
             '-lscipy_openblas', f'-Wl,-rpath,{blas_lib}']
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

