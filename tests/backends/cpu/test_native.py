"""Building, caching and loading the CPU backend's shared library."""

import importlib
import os
import stat
import sys

import jax.numpy as jnp
import pytest

from perceiver_jax import ops
from perceiver_jax.backends.cpu import attention
from perceiver_jax.backends.cpu import matmul
from perceiver_jax.backends.cpu import native
from tests import helpers

_BACKEND = 'perceiver_jax.backends.cpu.backend'


def test_a_failed_build_makes_the_backend_import_raise(monkeypatch):
  error = native.BuildError('no compiler')
  monkeypatch.setattr(native, '_built', {'error': error})
  monkeypatch.setattr(ops, '_registered', {})
  monkeypatch.delitem(sys.modules, _BACKEND, raising=False)
  with pytest.raises(native.BuildError, match='no compiler'):
    importlib.import_module(_BACKEND)
  assert 'cpu' not in ops._registered  # pylint: disable=protected-access
  # The kernels' own entry points say so too, for float32 operands.
  with pytest.raises(native.BuildError, match='no compiler'):
    matmul.matmul(jnp.ones((2, 2)), jnp.ones((2, 2)))
  q = jnp.ones((1, 2, 1, 3))
  with pytest.raises(native.BuildError, match='no compiler'):
    attention.attention(q, q, q)


def test_build_is_cached_and_leaves_no_partial_file(tmp_path):
  helpers.require_cpu_backend()
  path = native.build(cache_dir=str(tmp_path))
  assert path.exists() and path.parent == tmp_path / 'kernels'
  mtime = path.stat().st_mtime_ns
  assert native.build(cache_dir=str(tmp_path)) == path
  assert path.stat().st_mtime_ns == mtime  # Not rebuilt.
  assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_build_errors_say_what_failed(tmp_path):
  with pytest.raises(native.BuildError, match='did not run'):
    native.build(cache_dir=str(tmp_path),
                 compiler=str(tmp_path / 'no-such-compiler'))
  failing = tmp_path / 'failing-compiler'
  failing.write_text('#!/bin/sh\necho "cpu_matmul.cc:1: error: broken" >&2\n'
                     'exit 3\n')
  failing.chmod(failing.stat().st_mode | stat.S_IEXEC)
  with pytest.raises(native.BuildError,
                     match=r'(?s)failed \(exit 3\).*error: broken'):
    native.build(cache_dir=str(tmp_path), compiler=str(failing))
  assert not os.listdir(tmp_path / 'kernels')  # No partial file left.


def test_a_cached_library_that_does_not_load_is_rebuilt(tmp_path):
  helpers.require_cpu_backend()
  path = native.build(cache_dir=str(tmp_path))
  path.write_bytes(b'not a shared library')  # E.g. cut short elsewhere.
  library = native.load(cache_dir=str(tmp_path))
  for handler in native.HANDLERS.values():
    assert hasattr(library, handler)
  assert path.read_bytes() != b'not a shared library'


def test_an_unwritable_cache_is_a_build_error(tmp_path):
  not_a_folder = tmp_path / 'file'
  not_a_folder.write_text('')
  with pytest.raises(native.BuildError, match='PERCEIVER_JAX_CACHE'):
    native.build(cache_dir=str(not_a_folder))


def test_the_cache_key_names_the_cpu(tmp_path, monkeypatch):
  # A compiler that only writes its output: what is built does not matter.
  fake = tmp_path / 'fake-compiler'
  fake.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do\n'
                  '  if [ "$1" = -o ]; then : > "$2"; fi; shift\ndone\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  cache, compiler = str(tmp_path / 'cache'), str(fake)
  monkeypatch.setattr(native, '_cpu_identity', lambda: 'flags: avx2')
  path = native.build(cache_dir=cache, compiler=compiler)
  assert native.build(cache_dir=cache, compiler=compiler) == path
  monkeypatch.setattr(native, '_cpu_identity', lambda: 'flags: avx512f')
  other = native.build(cache_dir=cache, compiler=compiler)
  assert other != path and path.exists() and other.exists()
