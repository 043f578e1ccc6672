"""The OpenBLAS matrix-product kernel against NumPy and XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax import ops
from perceiver_jax.analysis import flops
from perceiver_jax.backends.cpu import matmul
from perceiver_jax.perf import profiling
from tests import helpers


@pytest.fixture(autouse=True)
def _cpu_backend():
  helpers.require_cpu_backend()


def _operands(rng, batch, m, k, n, transpose_a, transpose_b):
  a = rng.normal(size=batch + ((k, m) if transpose_a else (m, k)))
  b = rng.normal(size=batch + ((n, k) if transpose_b else (k, n)))
  return a, b


def _numpy_matmul(a, b, transpose_a, transpose_b):
  a = np.swapaxes(a, -1, -2) if transpose_a else a
  b = np.swapaxes(b, -1, -2) if transpose_b else b
  return a @ b


def _xla_matmul(a, b, transpose_a=False, transpose_b=False):
  """op(a) op(b) in XLA, as the kernel computes it."""
  a = jnp.swapaxes(a, -1, -2) if transpose_a else a
  b = jnp.swapaxes(b, -1, -2) if transpose_b else b
  return jnp.matmul(a, b, precision='highest')


def _kernel_calls(fn, *args) -> int:
  # A new function each time: jit would reuse an earlier trace of `fn`.
  hlo = jax.jit(lambda *a: fn(*a)).lower(*args).as_text()
  return hlo.count(matmul.TARGET)


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
  fn = lambda a, b: matmul.matmul(
      a, b, transpose_a=transpose_a, transpose_b=transpose_b)
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
  got = matmul.matmul(jnp.asarray(a, jnp.float32),
                      jnp.asarray(b, jnp.float32))
  np.testing.assert_allclose(got, a @ b, rtol=1e-5, atol=1e-5)
  got = matmul.matmul(jnp.asarray(a[0, 0], jnp.float32),
                      jnp.asarray(b, jnp.float32))
  np.testing.assert_allclose(got, a[0, 0] @ b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('a_shape,b_shape,out_shape', [
    ((3, 4, 0), (3, 0, 5), (3, 4, 5)),  # Nothing contracted: zeros.
    ((3, 0, 2), (3, 2, 5), (3, 0, 5)),
    ((0, 4, 2), (0, 2, 5), (0, 4, 5)),
])
def test_matmul_of_empty_arrays(a_shape, b_shape, out_shape):
  a = jnp.ones(a_shape, jnp.float32)
  b = jnp.ones(b_shape, jnp.float32)
  got = jax.jit(matmul.matmul)(a, b)
  assert got.shape == out_shape
  np.testing.assert_array_equal(got, np.zeros(out_shape))


@pytest.mark.parametrize('transpose_a', [False, True])
@pytest.mark.parametrize('transpose_b', [False, True])
def test_matmul_gradients_match_xla(transpose_a, transpose_b):
  rng = np.random.default_rng(2)
  a, b = _operands(rng, (3,), 6, 5, 4, transpose_a, transpose_b)
  a, b = jnp.asarray(a[:1], jnp.float32), jnp.asarray(b, jnp.float32)

  def loss(product):
    return lambda a, b: jnp.sum(jnp.sin(product(
        a, b, transpose_a=transpose_a, transpose_b=transpose_b)))

  got = jax.jit(jax.grad(loss(matmul.matmul), (0, 1)))(a, b)
  want = jax.grad(loss(_xla_matmul), (0, 1))(a, b)
  assert got[0].shape == a.shape  # Summed over the broadcast batch.
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  # The backward products run through the kernel too.
  assert _kernel_calls(jax.grad(loss(matmul.matmul), (0, 1)), a, b) == 3


def test_matmul_under_vmap():
  rng = np.random.default_rng(3)
  a = jnp.asarray(rng.normal(size=(4, 2, 5, 3)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(2, 3, 6)), jnp.float32)
  fn = lambda product: jax.vmap(lambda a: product(a, b))
  assert _kernel_calls(fn(matmul.matmul), a) == 1
  np.testing.assert_allclose(jax.jit(fn(matmul.matmul))(a),
                             fn(_xla_matmul)(a), rtol=1e-5, atol=1e-5)


def test_matmul_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r'contracted sizes 3 != 4'):
    matmul.matmul(jnp.ones((2, 3)), jnp.ones((4, 5)))
  with pytest.raises(ValueError, match=r'rank >= 2'):
    matmul.matmul(jnp.ones(3), jnp.ones((3, 5)))


def test_other_dtypes_run_in_xla():
  a = jnp.ones((2, 3, 4), jnp.bfloat16)
  fn = lambda a: matmul.matmul(a, a, transpose_b=True)
  assert _kernel_calls(fn, a) == 0
  assert fn(a).dtype == jnp.bfloat16
  np.testing.assert_array_equal(fn(a), jnp.full((2, 3, 3), 4, jnp.bfloat16))


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
  fn = lambda a, b: matmul.einsum(subscripts, a, b)
  assert _kernel_calls(fn, a, b) == calls
  np.testing.assert_allclose(fn(a, b), jnp.einsum(subscripts, a, b),
                             rtol=1e-5, atol=1e-5)


def test_flops_of_kernel_products_are_counted():
  rng = np.random.default_rng(5)
  a = jnp.asarray(rng.normal(size=(3, 7, 5)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(3, 7, 4)), jnp.float32)

  def loss(product):
    return lambda a, b: jnp.sum(product(a, b, transpose_a=True) ** 2)

  assert flops.count_flops(loss(matmul.matmul), a, b) == 2 * 3 * 5 * 4 * 7
  grad = lambda product: jax.grad(loss(product), (0, 1))
  assert (flops.count_flops(grad(matmul.matmul), a, b) ==
          flops.count_flops(grad(_xla_matmul), a, b) == 3 * 2 * 3 * 5 * 4 * 7)
  # The profiler reads the same FLOPs from the compiled HLO.
  hlo = jax.jit(grad(matmul.matmul)).lower(a, b).compile().as_text()
  kernel_flops = [i.dot_flops for i in profiling.parse_hlo(hlo).values()
                  if i.opcode == 'custom-call']
  assert sorted(kernel_flops) == [2 * 3 * 5 * 4 * 7] * 3


def _linear_loss(x, w, b):
  return jnp.sum(jnp.sin(ops.linear(x, w, b)))


def test_the_cpu_backend_takes_the_kernel_and_the_reference_does_not():
  """ops.linear's weight gradient is a kernel product on the CPU backend
  alone; both backends give the same values."""
  rng = np.random.default_rng(6)
  x, w, b = (jnp.asarray(rng.normal(size=s), jnp.float32)
             for s in ((2, 3, 4), (4, 5), (5,)))
  grad = jax.grad(_linear_loss, (0, 1, 2))
  results = {}
  for name in ('auto', 'cpu', 'reference'):
    with ops.use_backend(name):
      assert (_kernel_calls(grad, x, w, b) > 0) == (name != 'reference')
      results[name] = jax.jit(grad)(x, w, b)
      # Nested choices: the innermost holds, and the outer one comes back.
      with ops.use_backend('reference'):
        assert _kernel_calls(grad, x, w, b) == 0
      assert ops.current_backend() == name
  for got in (results['auto'], results['cpu']):
    for g, want in zip(got, results['reference']):
      np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"Unknown backend 'blsa'"):
    with ops.use_backend('blsa'):
      pass
