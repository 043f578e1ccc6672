"""The OpenBLAS matrix-product kernel against NumPy and XLA."""

import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax import flops
from perceiver_jax import profiling
from perceiver_jax.kernels import cpu_matmul


def _operands(rng, batch, m, k, n, transpose_a, transpose_b):
  a = rng.normal(size=batch + ((k, m) if transpose_a else (m, k)))
  b = rng.normal(size=batch + ((n, k) if transpose_b else (k, n)))
  return a, b


def _numpy_matmul(a, b, transpose_a, transpose_b):
  a = np.swapaxes(a, -1, -2) if transpose_a else a
  b = np.swapaxes(b, -1, -2) if transpose_b else b
  return a @ b


def _kernel_calls(fn, *args) -> int:
  return jax.jit(fn).lower(*args).as_text().count(cpu_matmul.TARGET)


@pytest.mark.parametrize('transpose_a', [False, True])
@pytest.mark.parametrize('transpose_b', [False, True])
@pytest.mark.parametrize('batch,m,k,n', [
    ((), 5, 7, 9),          # One product: split into row tiles (if any).
    ((), 333, 17, 65),      # Row tiles of uneven size.
    ((3,), 5, 7, 9),
    ((2, 3), 16, 8, 16),    # Enough products to share out whole.
    ((1, 1), 1, 1, 1),
])
def test_matmul_matches_numpy(batch, m, k, n, transpose_a, transpose_b):
  rng = np.random.default_rng(0)
  a, b = _operands(rng, batch, m, k, n, transpose_a, transpose_b)
  fn = lambda a, b: cpu_matmul.matmul(
      a, b, transpose_a=transpose_a, transpose_b=transpose_b, use_blas=True)
  args = [jnp.asarray(x, jnp.float32) for x in (a, b)]
  assert _kernel_calls(fn, *args) == 1
  got = jax.jit(fn)(*args)
  assert got.shape == batch + (m, n) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _numpy_matmul(a, b, transpose_a,
                                                transpose_b),
                             rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_matmul_broadcasts_batch_axes():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(1, 2, 5, 7)), rng.normal(size=(4, 1, 7, 3))
  got = cpu_matmul.matmul(jnp.asarray(a, jnp.float32),
                          jnp.asarray(b, jnp.float32), use_blas=True)
  np.testing.assert_allclose(got, a @ b, rtol=1e-5, atol=1e-5)
  got = cpu_matmul.matmul(jnp.asarray(a[0, 0], jnp.float32),
                          jnp.asarray(b, jnp.float32), use_blas=True)
  np.testing.assert_allclose(got, a[0, 0] @ b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('a_shape,b_shape,out_shape', [
    ((3, 4, 0), (3, 0, 5), (3, 4, 5)),  # Nothing contracted: zeros.
    ((3, 0, 2), (3, 2, 5), (3, 0, 5)),
    ((0, 4, 2), (0, 2, 5), (0, 4, 5)),
])
def test_matmul_of_empty_arrays(a_shape, b_shape, out_shape):
  a = jnp.ones(a_shape, jnp.float32)
  b = jnp.ones(b_shape, jnp.float32)
  got = jax.jit(lambda a, b: cpu_matmul.matmul(a, b, use_blas=True))(a, b)
  assert got.shape == out_shape
  np.testing.assert_array_equal(got, np.zeros(out_shape))


@pytest.mark.parametrize('transpose_a', [False, True])
@pytest.mark.parametrize('transpose_b', [False, True])
def test_matmul_gradients_match_xla(transpose_a, transpose_b):
  rng = np.random.default_rng(2)
  a, b = _operands(rng, (3,), 6, 5, 4, transpose_a, transpose_b)
  a, b = jnp.asarray(a[:1], jnp.float32), jnp.asarray(b, jnp.float32)

  def loss(use_blas):
    return lambda a, b: jnp.sum(jnp.sin(cpu_matmul.matmul(
        a, b, transpose_a=transpose_a, transpose_b=transpose_b,
        use_blas=use_blas)))

  got = jax.jit(jax.grad(loss(True), (0, 1)))(a, b)
  want = jax.grad(loss(False), (0, 1))(a, b)
  assert got[0].shape == a.shape  # Summed over the broadcast batch.
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  # The backward products run through the kernel too.
  assert _kernel_calls(jax.grad(loss(True), (0, 1)), a, b) == 3


def test_matmul_under_vmap():
  rng = np.random.default_rng(3)
  a = jnp.asarray(rng.normal(size=(4, 2, 5, 3)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(2, 3, 6)), jnp.float32)
  fn = lambda use_blas: jax.vmap(
      lambda a: cpu_matmul.matmul(a, b, use_blas=use_blas))
  np.testing.assert_allclose(jax.jit(fn(True))(a), fn(False)(a), rtol=1e-5,
                             atol=1e-5)


def test_matmul_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r'contracted sizes 3 != 4'):
    cpu_matmul.matmul(jnp.ones((2, 3)), jnp.ones((4, 5)), use_blas=True)
  with pytest.raises(ValueError, match=r'rank >= 2'):
    cpu_matmul.matmul(jnp.ones(3), jnp.ones((3, 5)), use_blas=True)


def test_other_dtypes_run_in_xla():
  a = jnp.ones((2, 3, 4), jnp.bfloat16)
  fn = lambda a: cpu_matmul.matmul(a, a, transpose_b=True, use_blas=True)
  assert _kernel_calls(fn, a) == 0
  assert fn(a).dtype == jnp.bfloat16


@pytest.mark.parametrize('subscripts,shapes,calls', [
    ('...nk,...mk->...nm', ((2, 3, 5, 4), (2, 3, 6, 4)), 1),
    ('...nk,...mk->...mn', ((2, 5, 4), (2, 6, 4)), 1),  # Operands swapped.
    ('...mn,...mv->...nv', ((2, 6, 5), (2, 6, 3)), 1),
    ('bnc,bnv->bcv', ((2, 5, 4), (2, 5, 3)), 1),
    ('ri,ro->io', ((7, 4), (7, 3)), 1),
    ('bhnk,bchk->bhnc', ((2, 3, 5, 4), (2, 6, 3, 4)), 0),  # Not one product.
    ('ij,ij->ij', ((3, 4), (3, 4)), 0),
    ('bij,bjk->ik', ((2, 3, 4), (2, 4, 5)), 0),
])
def test_einsum_takes_the_kernel_for_batched_products(subscripts, shapes,
                                                      calls):
  rng = np.random.default_rng(4)
  a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)
  fn = lambda a, b: cpu_matmul.einsum(subscripts, a, b, use_blas=True)
  assert _kernel_calls(fn, a, b) == calls
  np.testing.assert_allclose(fn(a, b), jnp.einsum(subscripts, a, b),
                             rtol=1e-5, atol=1e-5)


def test_flops_of_kernel_products_are_counted():
  rng = np.random.default_rng(5)
  a = jnp.asarray(rng.normal(size=(3, 7, 5)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(3, 7, 4)), jnp.float32)

  def loss(use_blas):
    return lambda a, b: jnp.sum(cpu_matmul.matmul(
        a, b, transpose_a=True, use_blas=use_blas) ** 2)

  assert flops.count_flops(loss(True), a, b) == 2 * 3 * 5 * 4 * 7
  grad = lambda use_blas: jax.grad(loss(use_blas), (0, 1))
  assert (flops.count_flops(grad(True), a, b) ==
          flops.count_flops(grad(False), a, b) == 3 * 2 * 3 * 5 * 4 * 7)
  # The profiler reads the same FLOPs from the compiled HLO.
  hlo = jax.jit(grad(True)).lower(a, b).compile().as_text()
  kernel_flops = [i.dot_flops for i in profiling.parse_hlo(hlo).values()
                  if i.opcode == 'custom-call']
  assert sorted(kernel_flops) == [2 * 3 * 5 * 4 * 7] * 3


def test_backend_context():
  assert cpu_matmul.enabled()  # 'auto' on CPU, where the kernel builds.
  with cpu_matmul.backend('xla'):
    assert not cpu_matmul.enabled()
    with cpu_matmul.backend('blas'):
      assert cpu_matmul.enabled()
    assert not cpu_matmul.enabled()
  with pytest.raises(ValueError, match=r"Unknown matmul backend 'blsa'"):
    with cpu_matmul.backend('blsa'):
      pass


def test_a_failed_build_falls_back_to_xla_unless_blas_is_required(
    monkeypatch):
  error = cpu_matmul.BuildError('no compiler')
  monkeypatch.setattr(cpu_matmul, '_built', {'error': error})
  assert not cpu_matmul.enabled()
  with cpu_matmul.backend('blas'):
    with pytest.raises(cpu_matmul.BuildError, match='no compiler'):
      cpu_matmul.enabled()
  with pytest.raises(cpu_matmul.BuildError, match='no compiler'):
    cpu_matmul.matmul(jnp.ones((2, 2)), jnp.ones((2, 2)), use_blas=True)


def test_build_is_cached_and_leaves_no_partial_file(tmp_path):
  path = cpu_matmul.build(cache_dir=str(tmp_path))
  assert path.exists() and path.parent == tmp_path / 'kernels'
  mtime = path.stat().st_mtime_ns
  assert cpu_matmul.build(cache_dir=str(tmp_path)) == path
  assert path.stat().st_mtime_ns == mtime  # Not rebuilt.
  assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_build_errors_say_what_failed(tmp_path):
  with pytest.raises(cpu_matmul.BuildError, match='did not run'):
    cpu_matmul.build(cache_dir=str(tmp_path),
                     compiler=str(tmp_path / 'no-such-compiler'))
  failing = tmp_path / 'failing-compiler'
  failing.write_text('#!/bin/sh\necho "cpu_matmul.cc:1: error: broken" >&2\n'
                     'exit 3\n')
  failing.chmod(failing.stat().st_mode | stat.S_IEXEC)
  with pytest.raises(cpu_matmul.BuildError,
                     match=r'(?s)failed \(exit 3\).*error: broken'):
    cpu_matmul.build(cache_dir=str(tmp_path), compiler=str(failing))
  assert not os.listdir(tmp_path / 'kernels')  # No partial file left.


def test_a_cached_library_that_does_not_load_is_rebuilt(tmp_path):
  path = cpu_matmul.build(cache_dir=str(tmp_path))
  path.write_bytes(b'not a shared library')  # E.g. cut short elsewhere.
  library = cpu_matmul.load(cache_dir=str(tmp_path))
  assert hasattr(library, 'PerceiverJaxCpuMatmul')
  assert path.read_bytes() != b'not a shared library'


def test_an_unwritable_cache_is_a_build_error(tmp_path):
  not_a_folder = tmp_path / 'file'
  not_a_folder.write_text('')
  with pytest.raises(cpu_matmul.BuildError, match='PERCEIVER_JAX_CACHE'):
    cpu_matmul.build(cache_dir=str(not_a_folder))
