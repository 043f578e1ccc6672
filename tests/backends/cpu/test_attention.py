"""The fused CPU attention kernel against softmax attention in XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax import ops
from perceiver_jax.analysis import flops
from perceiver_jax.backends.cpu import attention
from perceiver_jax.ops import byte_array
from perceiver_jax.perf import profiling
from tests import helpers


@pytest.fixture(autouse=True)
def _cpu_backend():
  helpers.require_cpu_backend()


def _reference(q, k, v):
  """softmax(q k^T) v per example and head, in float64 NumPy."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum('bnhk,bmhk->bhnm', q, k)
  if logits.shape[-1] == 0:
    return np.zeros(q.shape[:3] + v.shape[-1:])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum('bhnm,bmhv->bnhv', weights, v)


def _xla_attention(q, k, v):
  logits = jnp.einsum('bnhk,bmhk->bhnm', q, k, precision='highest')
  return jnp.einsum('bhnm,bmhv->bnhv', jax.nn.softmax(logits, -1), v,
                    precision='highest')


def _operands(seed, batch, n, m, heads, depth, width, logit_scale=1.0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, n, heads, depth)) * logit_scale
  k = jax.random.normal(keys[1], (batch, m, heads, depth))
  v = jax.random.normal(keys[2], (batch, m, heads, width))
  g = jax.random.normal(keys[3], (batch, n, heads, width))
  return q, k, v, g


def _assert_close(got, want, rtol=1e-5):
  """Within rtol of the largest entry of `want` (zeros for empty arrays)."""
  want = np.asarray(want)
  assert got.shape == want.shape
  scale = np.abs(want).max() if want.size else 0.0
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * max(scale, 1e-30))


SHAPES = [
    # batch, n, m, heads, depth, width
    (2, 5, 7, 1, 3, 4),          # One tile.
    (3, 130, 600, 2, 13, 9),     # Uneven key tiles, two heads.
    (1, 300, 1000, 1, 133, 133), # Two query tiles; keys split over threads.
    (2, 1, 257, 3, 1, 2),        # One query; one key past a tile.
    (1, 70, 520, 8, 16, 16),     # Many heads, strided rows.
]


@pytest.mark.parametrize('shape', SHAPES)
def test_attention_matches_softmax_attention(shape):
  q, k, v, _ = _operands(0, *shape)
  _assert_close(attention.attention(q, k, v), _reference(q, k, v))


def test_large_logits_are_stable():
  # Logits in the hundreds: the online softmax's running max changes from
  # tile to tile, and exp(logit) alone would overflow.
  q, k, v, _ = _operands(1, 2, 40, 900, 1, 8, 5, logit_scale=60.0)
  out = attention.attention(q, k, v)
  assert np.all(np.isfinite(out))
  # float32 logits of ~500 are rounded by up to 3e-5, which exp passes on.
  _assert_close(out, _reference(q, k, v), rtol=1e-4)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('argnums', [(0, 1, 2), (0,), (1,), (2,), (1, 2)])
def test_gradients_match_xla(shape, argnums):
  q, k, v, g = _operands(2, *shape)

  def grads(fn):
    loss = lambda *qkv: jnp.sum(fn(*qkv) * g)
    return jax.jit(jax.grad(loss, argnums))(q, k, v)

  for got, want in zip(grads(attention.attention), grads(_xla_attention)):
    _assert_close(got, want)


@pytest.mark.parametrize('shape', [
    (2, 4, 0, 2, 3, 3),   # No keys: zeros, and zero gradients.
    (1, 40, 70, 1, 8, 0),
    (5, 3, 9, 2, 0, 4),
    (0, 3, 9, 2, 4, 4),
])
def test_empty_sizes(shape):
  q, k, v, g = _operands(3, *shape)
  _assert_close(attention.attention(q, k, v), _reference(q, k, v))
  loss = lambda *qkv: jnp.sum(attention.attention(*qkv) * g)
  got = jax.grad(loss, (0, 1, 2))(q, k, v)
  if shape[2]:
    want = jax.grad(lambda *qkv: jnp.sum(_xla_attention(*qkv) * g),
                    (0, 1, 2))(q, k, v)
  else:
    want = [np.zeros(x.shape) for x in (q, k, v)]
  for got_grad, want_grad in zip(got, want):
    _assert_close(got_grad, want_grad)


def test_under_vmap():
  q, k, v, _ = _operands(4, 6, 9, 30, 2, 4, 3)
  batched = [x.reshape((2, 3) + x.shape[1:]) for x in (q, k, v)]
  out = jax.vmap(attention.attention)(*batched)
  _assert_close(out.reshape((6,) + out.shape[2:]), _reference(q, k, v))


def test_bad_operands_are_rejected():
  q, k, v, _ = _operands(5, 2, 3, 4, 1, 5, 6)
  with pytest.raises(ValueError, match=r'q \[B, N, H, K\]'):
    attention.attention(q[0], k, v)
  with pytest.raises(ValueError, match=r'q \[B, N, H, K\]'):
    attention.attention(q, k[..., :4], v)
  with pytest.raises(ValueError, match=r'q \[B, N, H, K\]'):
    attention.attention(q, k, v[:, :3])
  with pytest.raises(ValueError, match='float32'):
    attention.attention(q.astype(jnp.bfloat16), k, v)


@pytest.mark.parametrize('argnums,need_dq,need_dkv', [
    ((0, 1, 2), True, True), ((0,), True, False), ((2,), False, True)])
def test_flops_are_counted(argnums, need_dq, need_dkv):
  batch, n, m, heads, depth, width = 2, 8, 11, 3, 5, 7
  q, k, v, g = _operands(6, batch, n, m, heads, depth, width)
  forward = lambda *qkv: attention.attention(*qkv)
  per_product = 2 * batch * heads * n * m
  assert flops.count_flops(forward, q, k, v) == per_product * (depth + width)
  # Backward: q k^T and g v^T, then the gradients asked for.
  backward_flops = per_product * (depth + width + need_dq * depth +
                                  need_dkv * (depth + width))
  grad = jax.grad(lambda *qkv: jnp.sum(forward(*qkv) * g), argnums)
  hlo = jax.jit(grad).lower(q, k, v).compile().as_text()
  kernel_flops = sorted(i.dot_flops for i in profiling.parse_hlo(hlo).values()
                        if i.opcode == 'custom-call')
  assert kernel_flops == sorted([per_product * (depth + width),
                                 backward_flops])
  assert flops.count_flops(grad, q, k, v) == sum(kernel_flops)


def _fused_calls(fn, *args) -> int:
  # A new function each time: jit would reuse an earlier trace of `fn`.
  hlo = jax.jit(lambda *a: fn(*a)).lower(*args).as_text()
  return hlo.count(attention.FORWARD_TARGET)


@pytest.mark.parametrize('backend, calls', [
    ('auto', 1), ('cpu', 1), ('reference', 0)])
def test_the_backend_choice_decides_whether_the_kernel_runs(backend, calls):
  q, k, v, _ = _operands(7, 2, 5, 9, 2, 4, 3)
  with ops.use_backend(backend):
    assert _fused_calls(ops.attention, q, k, v) == calls
    with ops.use_backend('reference'):  # The innermost choice holds.
      assert _fused_calls(ops.attention, q, k, v) == 0
    assert _fused_calls(ops.attention, q, k, v) == calls


@pytest.mark.parametrize('heads', [1, 4])
@pytest.mark.parametrize('chunk_size', [None, 64])
def test_ops_attention_takes_the_kernel(heads, chunk_size):
  q, k, v, g = _operands(7, 2, 20, 300, heads, 8, 6)
  fn = lambda q, k, v: ops.attention(q, k, v, chunk_size=chunk_size)
  loss = lambda *qkv: jnp.sum(fn(*qkv) * g)
  assert _fused_calls(fn, q, k, v) == 1
  with ops.use_backend('reference'):
    assert _fused_calls(fn, q, k, v) == 0
    want, want_grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)
  got, got_grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)
  _assert_close(got, want)
  for got_grad, want_grad in zip(got_grads, want_grads):
    _assert_close(got_grad, want_grad)


def test_masks_and_other_dtypes_stay_in_xla():
  q, k, v, _ = _operands(8, 2, 20, 30, 1, 8, 6)
  mask = jnp.arange(30)[None] < jnp.array([[10], [30]])
  assert _fused_calls(lambda q, k, v: ops.attention(q, k, v, mask),
                      q, k, v) == 0
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  assert _fused_calls(ops.attention, *bf16) == 0


def _split_operands(seed, batch, n, m, features, shared):
  keys = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(keys[0], (batch, n, features + shared)) * 0.3
  x = jax.random.normal(keys[1], (batch, m, features)) * 2 + 1
  pos = jax.random.uniform(keys[2], (m, shared), minval=-1, maxval=1)
  mean = jax.random.normal(keys[3], (batch, m)) * 0.1
  inv_std = jax.random.uniform(keys[4], (batch, m), minval=0.5, maxval=2)
  g = jax.random.normal(keys[5], (batch, n, features + shared))
  return q, x, pos, mean, inv_std, g


def _dense_standardized_attention(q, x, pos, mean, inv_std):
  rows = byte_array.standardized_rows(x, pos, mean, inv_std)[:, :, None]
  return _xla_attention(q[:, :, None], rows, rows)[:, :, 0]


SPLIT_SHAPES = [
    # batch, n, m, features, shared
    (2, 5, 7, 3, 4),           # One tile.
    (3, 40, 600, 3, 130),      # Uneven key tiles; bench_a's channels.
    (1, 300, 520, 1, 20),      # Two query tiles.
    (2, 3, 9, 5, 0),           # No shared channels.
]


@pytest.mark.parametrize('shape', SPLIT_SHAPES)
def test_standardized_attention_matches_the_built_rows(shape):
  q, x, pos, mean, inv_std, _ = _split_operands(9, *shape)
  rows = np.asarray(byte_array.standardized_rows(x, pos, mean, inv_std))
  _assert_close(
      jax.jit(attention.standardized_attention)(q, x, pos, mean, inv_std),
      _reference(q[:, :, None], rows[:, :, None], rows[:, :, None])[:, :, 0])


@pytest.mark.parametrize('shape', SPLIT_SHAPES[:3])
@pytest.mark.parametrize('argnums', [(0,), (0, 1, 2, 3, 4), (1, 4)])
def test_standardized_attention_gradients_match_xla(shape, argnums):
  q, x, pos, mean, inv_std, g = _split_operands(10, *shape)
  args = (q, x, pos, mean, inv_std)
  grad = lambda fn: jax.jit(jax.grad(
      lambda *a: jnp.sum(fn(*a) * g), argnums))(*args)
  got = grad(attention.standardized_attention)
  want = grad(_dense_standardized_attention)
  for got_grad, want_grad in zip(got, want):
    _assert_close(got_grad, want_grad)


def test_standardized_attention_without_inputs_gives_zeros():
  q, x, pos, mean, inv_std, _ = _split_operands(11, 2, 3, 0, 2, 3)
  out = attention.standardized_attention(q, x, pos, mean, inv_std)
  np.testing.assert_array_equal(out, np.zeros(q.shape))


def test_standardized_attention_rejects_bad_operands():
  q, x, pos, mean, inv_std, _ = _split_operands(12, 2, 3, 8, 2, 3)
  for bad, match in [((q[..., :4], x, pos, mean, inv_std), 'F \\+ P'),
                     ((q, x, pos[:5], mean, inv_std), 'shared \\[M, P\\]'),
                     ((q, x, pos, mean[:, :5], inv_std), 'inv_std \\[B, M\\]'),
                     ((q, x, pos, mean, inv_std[None]), 'inv_std \\[B, M\\]')]:
    with pytest.raises(ValueError, match=match):
      attention.standardized_attention(*bad)
  with pytest.raises(ValueError, match='float32'):
    attention.standardized_attention(
        q, x.astype(jnp.bfloat16), pos, mean, inv_std)


def test_standardized_attention_flops_are_counted():
  batch, n, m, features, shared = 2, 8, 11, 3, 4
  args = _split_operands(13, batch, n, m, features, shared)[:5]
  width = features + shared
  forward_flops = 2 * batch * n * m * 2 * width
  assert flops.count_flops(attention.standardized_attention,
                           *args) == forward_flops
  # Backward for q alone (rows rebuilt per tile): q k^T, g v^T and ds k.
  backward_flops = 2 * batch * n * m * 3 * width
  g = _split_operands(13, batch, n, m, features, shared)[5]
  grad = jax.grad(lambda *a: jnp.sum(
      attention.standardized_attention(*a) * g))
  hlo = jax.jit(grad).lower(*args).compile().as_text()
  assert hlo.count(attention.STANDARDIZED_BACKWARD_TARGET) == 1
  assert hlo.count(f'"{attention.BACKWARD_TARGET}"') == 0
  assert sorted(i.dot_flops for i in profiling.parse_hlo(hlo).values()
                if i.opcode == 'custom-call') == [forward_flops,
                                                  backward_flops]
  assert flops.count_flops(grad, *args) == forward_flops + backward_flops
