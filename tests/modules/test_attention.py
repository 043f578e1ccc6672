"""Tests for the attention function and the attention/MLP blocks."""

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax.kernels import cpu_attention
from perceiver_jax.modules import attention


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


def test_attention_matches_numpy():
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(2, 3, 4, 8)), rng.normal(size=(2, 5, 4, 8))
  v = rng.normal(size=(2, 5, 4, 6))
  got = attention.dot_product_attention(
      *(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
  assert got.shape == (2, 3, 4, 6)
  np.testing.assert_allclose(got, _numpy_attention(q, k, v), atol=1e-5)


def test_key_mask_equals_dropping_keys_and_empty_rows_are_zero():
  rng = np.random.default_rng(1)
  q, k = rng.normal(size=(2, 3, 2, 4)), rng.normal(size=(2, 6, 2, 4))
  v = rng.normal(size=(2, 6, 2, 4))
  mask = np.array([[1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
  got = attention.dot_product_attention(
      *(jnp.asarray(x, jnp.float32) for x in (q, k, v)), mask=mask)
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, mask), atol=1e-5)
  np.testing.assert_array_equal(got[1], 0.0)


def test_bad_mask_shape_raises():
  x = jnp.ones((2, 3, 1, 4))
  with pytest.raises(ValueError, match='mask'):
    attention.dot_product_attention(x, x, x, mask=jnp.ones((2, 4), bool))


def _autodiff_attention(q, k, v, mask):
  """The attention of P1 in plain jnp, differentiated by JAX itself."""
  logits = jnp.einsum('bnhk,bmhk->bhnm', q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(mask[:, None, None], logits, -1e30)
  weights = jax.nn.softmax(logits) * jnp.any(mask, -1)[:, None, None, None]
  return jnp.einsum('bhnm,bmhv->bnhv', weights, v)


@pytest.mark.parametrize('argnums', [(0, 1, 2), (0,), (1, 2), (2,)])
@pytest.mark.parametrize('heads, chunk_size', [(2, None), (1, None), (2, 4),
                                               (1, 4)])
def test_hand_written_gradients_match_autodiff(argnums, heads, chunk_size):
  rng = np.random.default_rng(2)
  q, k = rng.normal(size=(2, 3, heads, 4)), rng.normal(size=(2, 6, heads, 4))
  v = rng.normal(size=(2, 6, heads, 5))
  q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
  mask = jnp.array([[1, 1, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0]], bool)
  ours = functools.partial(attention.dot_product_attention,
                           chunk_size=chunk_size)
  loss = lambda f: lambda *qkv: jnp.sum(jnp.sin(f(*qkv, mask)) * 3.0)
  np.testing.assert_allclose(ours(q, k, v, mask),
                             _autodiff_attention(q, k, v, mask), atol=1e-6)
  got = jax.grad(loss(ours), argnums)(q, k, v)
  want = jax.grad(loss(_autodiff_attention), argnums)(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5)


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('heads', [1, 2])
def test_chunked_gradient_keeps_no_copy_of_the_keys(heads, fused):
  """Training through chunked attention to data keys/values holds less than
  one [B, M, H, K] array beyond its inputs (no chunks saved per step); so
  does the fused CPU kernel, which works in tiles whatever the chunk size."""
  b, n, m, k = 2, 8, 8192, 16
  q = jnp.ones((b, n, heads, k // heads))
  kv = jnp.ones((b, m, heads, k // heads))
  grad = jax.jit(jax.grad(lambda q, kv: jnp.sum(
      attention.dot_product_attention(q, kv, kv, chunk_size=512))))
  with cpu_attention.fused(fused):  # Read while tracing, in lower().
    temp = grad.lower(q, kv).compile().memory_analysis().temp_size_in_bytes
  assert temp < kv.nbytes / 2


@pytest.mark.parametrize('use_blas', [False, True])
def test_one_head_layouts_agree(use_blas):
  """One head: logits held keys-major [B, M, N] (on CPU) or [B, N, M] (on
  other backends) give the same outputs and gradients."""
  rng = np.random.default_rng(4)
  q, k = rng.normal(size=(2, 3, 1, 4)), rng.normal(size=(2, 6, 1, 4))
  v = rng.normal(size=(2, 6, 1, 5))
  q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
  mask = attention._check_mask(
      jnp.array([[1, 1, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0]], bool), 2, 3, 6)

  def attend(keys_major):
    return lambda q, k, v: attention._attend(
        q[:, :, 0], k[:, :, 0], v[:, :, 0], mask[:, 0], 0.5, keys_major,
        use_blas)

  loss = lambda f: lambda *qkv: jnp.sum(jnp.sin(f(*qkv)) * 3.0)
  np.testing.assert_allclose(attend(True)(q, k, v), attend(False)(q, k, v),
                             atol=1e-6)
  got = jax.grad(loss(attend(True)), (0, 1, 2))(q, k, v)
  want = jax.grad(loss(attend(False)), (0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5)


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('chunk_size', [None, 64])
def test_one_head_attention_with_a_broadcast_query(chunk_size, fused):
  """Queries shared by the batch, as latents are (XLA:CPU miscompiled the
  keys-major logits of a broadcast query; see attention._unbroadcast). Also
  without the fused CPU kernel, which would otherwise take this attention."""
  rng = np.random.default_rng(5)
  b, n, c, m = 4, 32, 13, 256
  q, x = rng.normal(size=(n, c)), rng.normal(size=(b, m, c))
  attend = jax.jit(lambda q, x: attention.dot_product_attention(
      jnp.broadcast_to(q, (b, n, c))[:, :, None], x[:, :, None],
      x[:, :, None], chunk_size=chunk_size))
  with cpu_attention.fused(fused):  # Read while tracing, at the first call.
    got = attend(jnp.asarray(q, jnp.float32), jnp.asarray(x, jnp.float32))
  want = _numpy_attention(np.broadcast_to(q, (b, n, c))[:, :, None],
                          x[:, :, None], x[:, :, None])
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_layer_norm_matches_haiku_with_gradients():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 3, 8)) * 3 + 1, jnp.float32)
  g = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
  params = {'ln': {'scale': jnp.asarray(rng.normal(size=8), jnp.float32),
                   'offset': jnp.asarray(rng.normal(size=8), jnp.float32)}}
  ours = hk.without_apply_rng(hk.transform(
      lambda x: attention.layer_norm('ln')(x)))
  haikus = hk.without_apply_rng(hk.transform(lambda x: hk.LayerNorm(
      -1, True, True, eps=1e-5, name='ln')(x)))
  assert jax.tree.map(jnp.shape, ours.init(None, x)) == jax.tree.map(
      jnp.shape, params)
  np.testing.assert_allclose(ours.apply(params, x), haikus.apply(params, x),
                             atol=1e-5)
  loss = lambda t: lambda p, x: jnp.sum(jnp.sin(t.apply(p, x)) * g)
  got = jax.grad(loss(ours), (0, 1))(params, x)
  want = jax.grad(loss(haikus), (0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_linear_gradients_match_autodiff():
  rng = np.random.default_rng(3)
  x, w, b = (jnp.asarray(rng.normal(size=s), jnp.float32)
             for s in ((2, 3, 4), (4, 5), (5,)))
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  for argnums in ((0, 1, 2), (1,), (0,), (2,)):
    got = jax.grad(loss(attention.linear), argnums)(x, w, b)
    want = jax.grad(loss(lambda x, w, b: x @ w + b), argnums)(x, w, b)
    for g, ref in zip(got, want):
      np.testing.assert_allclose(g, ref, atol=1e-5)


def _init_apply(fn, *args):
  f = hk.transform(fn)
  params = f.init(jax.random.key(0), *args)
  return params, f.apply(params, None, *args)


def test_cross_attention_widths_default_to_kv_width():
  latents, inputs = jnp.ones((2, 4, 16)), jnp.ones((2, 10, 6))
  params, out = _init_apply(
      lambda q, kv: attention.CrossAttention(name='cross')(
          q, kv, is_training=False), latents, inputs)
  assert out.shape == (2, 4, 16)
  assert params['cross/~/attention/~/query']['w'].shape == (16, 6)
  assert params['cross/~/attention/~/key']['w'].shape == (6, 6)
  assert params['cross/~/attention/~/value']['w'].shape == (6, 6)
  assert params['cross/~/attention/~/output']['w'].shape == (6, 16)
  assert params['cross/~/mlp/hidden']['w'].shape == (16, 16)


def test_query_residual_off_changes_output():
  q, kv = jax.random.normal(jax.random.key(1), (1, 2, 8)), jnp.ones((1, 3, 8))
  fns = [hk.transform(lambda a, b, r=r: attention.CrossAttention(
      use_query_residual=r, name='c')(a, b, is_training=False))
         for r in (True, False)]
  params = fns[0].init(jax.random.key(0), q, kv)
  with_res, without = (f.apply(params, None, q, kv) for f in fns)
  assert not np.allclose(with_res, without)


def test_self_attention_and_mlp_shapes():
  x = jnp.ones((2, 5, 16))
  params, out = _init_apply(
      lambda x: attention.SelfAttention(num_heads=4, widening_factor=4,
                                        name='sa')(x, is_training=False), x)
  assert out.shape == x.shape
  assert params['sa/~/mlp/hidden']['w'].shape == (16, 64)


def test_heads_must_divide_width():
  with pytest.raises(ValueError, match='not divisible by num_heads=3'):
    _init_apply(lambda x: attention.SelfAttention(num_heads=3)(
        x, is_training=False), jnp.ones((1, 2, 16)))


def test_dropout_only_in_training():
  x = jax.random.normal(jax.random.key(3), (2, 5, 16))
  f = hk.transform(lambda x, t: attention.SelfAttention(
      num_heads=2, dropout_prob=0.5)(x, is_training=t))
  params = f.init(jax.random.key(0), x, True)
  eval_out = f.apply(params, None, x, False)
  a = f.apply(params, jax.random.key(1), x, True)
  b = f.apply(params, jax.random.key(2), x, True)
  assert not np.allclose(a, b)
  np.testing.assert_allclose(eval_out, f.apply(params, None, x, False))
