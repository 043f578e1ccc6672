"""Helpers shared by several test modules."""

import os
import socket
import subprocess
import sys
from typing import Optional

import pytest

from perceiver_jax.perf import host_memory

# The repository root (scripts, configs; PYTHONPATH for subprocesses).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def require_cpu_backend() -> None:
  """Skips the calling test where the CPU backend's kernels cannot build.

  Otherwise the backend is imported, so its ops and FLOP rules are
  registered with `perceiver_jax.ops`.
  """
  # pylint: disable=g-import-not-at-top,unused-import
  from perceiver_jax.backends.cpu import native
  try:
    from perceiver_jax.backends.cpu import backend
  except native.BuildError as e:
    pytest.skip(f'the CPU backend does not build here: {e}')


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free now (for jax.distributed)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def multiprocess_environ(**extra: str) -> dict[str, str]:
  """os.environ for the processes of one multi-process JAX run, plus `extra`.

  Without the test run's persistent compilation cache (tests/conftest.py):
  there a process can load an executable another process of the run wrote
  and wait in it forever.
  """
  env = {k: v for k, v in os.environ.items()
         if k != 'JAX_COMPILATION_CACHE_DIR'}
  return {**env, **extra}


def environ_without_malloc_settings(**extra: str) -> dict[str, str]:
  """os.environ without the variables that choose glibc's malloc settings
  (perceiver_jax/perf/host_memory), plus `extra`."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', host_memory.MODE_VARIABLE,
                      host_memory.OLD_OPT_OUT)}
  return {**env, **extra}


def run_benchmark_script(*args: str, malloc: Optional[str] = 'system'
                         ) -> subprocess.CompletedProcess:
  """scripts/benchmark.py on the digits debug config.

  `malloc` is PERCEIVER_JAX_MALLOC ('system': glibc's own settings); None
  leaves the script's default.
  """
  env = environ_without_malloc_settings()
  if malloc is not None:
    env[host_memory.MODE_VARIABLE] = malloc
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, 'scripts', 'benchmark.py'),
       '--config=' + os.path.join(ROOT, 'configs', 'digits.py') + ':debug',
       *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


class ScalarRecorder:
  """A jaxline writer that keeps the (step, scalars) it is given."""

  def __init__(self):
    self.scalars = []

  def write_scalars(self, step, scalars):
    self.scalars.append((int(step), dict(scalars)))
