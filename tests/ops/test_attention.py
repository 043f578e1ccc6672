"""The attention ops against NumPy and autodiff, on every backend."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax import ops
from tests import helpers

BACKENDS = ['reference', 'cpu']


@pytest.fixture(params=BACKENDS, autouse=True)
def backend(request):
  """Runs the test under each backend ('cpu' skips where it cannot build)."""
  if request.param == 'cpu':
    helpers.require_cpu_backend()
  with ops.use_backend(request.param):
    yield request.param


def _numpy_attention(q, k, v, mask=None):
  """softmax(q k^T / sqrt(K)) v per head, in float64 NumPy loops."""
  b, n, h, d = q.shape
  out = np.zeros((b, n, h, v.shape[-1]))
  for bi in range(b):
    for hi in range(h):
      logits = q[bi, :, hi] @ k[bi, :, hi].T / np.sqrt(d)  # [N, M]
      for ni in range(n):
        keep = np.ones(k.shape[1], bool) if mask is None else mask[bi]
        if not keep.any():
          continue
        w = np.exp(logits[ni, keep] - logits[ni, keep].max())
        out[bi, ni, hi] = (w / w.sum()) @ v[bi, keep, hi]
  return out


@pytest.mark.parametrize('heads', [1, 4])
def test_attention_matches_numpy(heads):
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(2, 3, heads, 8)), rng.normal(size=(2, 5, heads, 8))
  v = rng.normal(size=(2, 5, heads, 6))
  got = ops.attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
  assert got.shape == (2, 3, heads, 6)
  np.testing.assert_allclose(got, _numpy_attention(q, k, v), atol=1e-5)


@pytest.mark.parametrize('chunk_size', [None, 4])
def test_key_mask_equals_dropping_keys_and_empty_rows_are_zero(chunk_size):
  rng = np.random.default_rng(1)
  q, k = rng.normal(size=(2, 3, 2, 4)), rng.normal(size=(2, 6, 2, 4))
  v = rng.normal(size=(2, 6, 2, 4))
  mask = np.array([[1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
  got = ops.attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)),
                      mask=mask, chunk_size=chunk_size)
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, mask), atol=1e-5)
  np.testing.assert_array_equal(got[1], 0.0)


def test_bad_shapes_and_masks_raise():
  x = jnp.ones((2, 3, 1, 4))
  with pytest.raises(ValueError, match='mask'):
    ops.attention(x, x, x, mask=jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match='Incompatible'):
    ops.attention(x, jnp.ones((2, 3, 2, 4)), x)
  with pytest.raises(ValueError, match='chunk_size must be >= 1'):
    ops.attention(x, x, x, chunk_size=0)
  with pytest.raises(ValueError, match='attend_to_inputs needs'):
    ops.attend_to_inputs(jnp.ones((2, 3, 4)), jnp.ones((2, 5, 6)), scale=1.0)


def _autodiff_attention(q, k, v, mask):
  """The attention of P1 in plain jnp, differentiated by JAX itself."""
  logits = jnp.einsum('bnhk,bmhk->bhnm', q, k) / np.sqrt(q.shape[-1])
  if mask is None:
    return jnp.einsum('bhnm,bmhv->bnhv', jax.nn.softmax(logits), v)
  logits = jnp.where(mask[:, None, None], logits, -1e30)
  weights = jax.nn.softmax(logits) * jnp.any(mask, -1)[:, None, None, None]
  return jnp.einsum('bhnm,bmhv->bnhv', weights, v)


@pytest.mark.parametrize('argnums', [(0, 1, 2), (0,), (1, 2), (2,)])
@pytest.mark.parametrize('heads, chunk_size', [(2, None), (1, None), (2, 4),
                                               (1, 4)])
@pytest.mark.parametrize('masked', [True, False])
def test_gradients_match_autodiff(argnums, heads, chunk_size, masked):
  rng = np.random.default_rng(2)
  q, k = rng.normal(size=(2, 3, heads, 4)), rng.normal(size=(2, 6, heads, 4))
  v = rng.normal(size=(2, 6, heads, 5))
  q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
  mask = jnp.array([[1, 1, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0]], bool)
  mask = mask if masked else None
  ours = functools.partial(ops.attention, chunk_size=chunk_size)
  loss = lambda f: lambda *qkv: jnp.sum(jnp.sin(f(*qkv, mask)) * 3.0)
  np.testing.assert_allclose(ours(q, k, v, mask),
                             _autodiff_attention(q, k, v, mask), atol=1e-6)
  got = jax.grad(loss(ours), argnums)(q, k, v)
  want = jax.grad(loss(_autodiff_attention), argnums)(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5)


@pytest.mark.parametrize('heads', [1, 2])
def test_chunked_gradient_keeps_no_copy_of_the_keys(heads):
  """Training through chunked attention to data keys/values holds less than
  one [B, M, H, K] array beyond its inputs (no chunks saved per step); so
  does the CPU backend's fused kernel, which works in tiles of its own."""
  b, n, m, k = 2, 8, 8192, 16
  q = jnp.ones((b, n, heads, k // heads))
  kv = jnp.ones((b, m, heads, k // heads))
  grad = jax.jit(jax.grad(lambda q, kv: jnp.sum(
      ops.attention(q, kv, kv, chunk_size=512))))
  temp = grad.lower(q, kv).compile().memory_analysis().temp_size_in_bytes
  assert temp < kv.nbytes / 2


@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('chunk_size', [None, 64])
def test_one_head_attention_with_a_broadcast_query(chunk_size, masked):
  """Queries shared by the batch, as latents are (XLA:CPU miscompiled the
  CPU backend's keys-major logits of a broadcast query, see
  backends/cpu/gradients._unbroadcast). An all-true mask takes the CPU
  backend's unfused path."""
  rng = np.random.default_rng(5)
  b, n, c, m = 4, 32, 13, 256
  q, x = rng.normal(size=(n, c)), rng.normal(size=(b, m, c))
  mask = jnp.ones((b, m), bool) if masked else None
  attend = jax.jit(lambda q, x: ops.attention(
      jnp.broadcast_to(q, (b, n, c))[:, :, None], x[:, :, None],
      x[:, :, None], mask, chunk_size=chunk_size))
  got = attend(jnp.asarray(q, jnp.float32), jnp.asarray(x, jnp.float32))
  want = _numpy_attention(np.broadcast_to(q, (b, n, c))[:, :, None],
                          x[:, :, None], x[:, :, None])
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_linear_gradients_match_autodiff():
  rng = np.random.default_rng(3)
  x, w, b = (jnp.asarray(rng.normal(size=s), jnp.float32)
             for s in ((2, 3, 4), (4, 5), (5,)))
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  for argnums in ((0, 1, 2), (1,), (0,), (2,)):
    got = jax.grad(loss(ops.linear), argnums)(x, w, b)
    want = jax.grad(loss(lambda x, w, b: x @ w + b), argnums)(x, w, b)
    for g, ref in zip(got, want):
      np.testing.assert_allclose(g, ref, atol=1e-5)


def test_layer_norm_matches_numpy_with_gradients():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 3, 8)) * 3 + 1, jnp.float32)
  scale, offset = (jnp.asarray(rng.normal(size=8), jnp.float32)
                   for _ in range(2))

  def written_out(x, scale, offset):
    mean, var = jnp.mean(x, -1, keepdims=True), jnp.var(x, -1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-5) * scale + offset

  np.testing.assert_allclose(ops.layer_norm(x, scale, offset, 1e-5),
                             written_out(x, scale, offset), atol=1e-5)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)) * jnp.arange(8.0))
  got = jax.grad(loss(functools.partial(ops.layer_norm, eps=1e-5)),
                 (0, 1, 2))(x, scale, offset)
  want = jax.grad(loss(written_out), (0, 1, 2))(x, scale, offset)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-4)
