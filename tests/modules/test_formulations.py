"""Exact reformulations of cross-attention give the direct results."""

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax import ops
from perceiver_jax.backends.cpu import attention as cpu_attention
from perceiver_jax.modules import attention
from perceiver_jax.modules import perceiver
from perceiver_jax.ops import byte_array


def _assert_close(a, b, rtol=1e-5):
  """Relative to each array's scale (float32 sums in a different order)."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    scale = max(np.max(np.abs(y)), 1e-30)
    np.testing.assert_array_less(np.max(np.abs(x - y)) / scale, rtol)


def _cross(formulation, chunk_size=None):
  def fn(q, kv, mask):
    return attention.CrossAttention(
        formulation=formulation, chunk_size=chunk_size, name='cross')(
            q, kv, is_training=False, mask=mask)
  return hk.transform(fn)


def _data(m=37, mask_kind=None):
  q = jax.random.normal(jax.random.key(0), (2, 5, 16))
  kv = jax.random.normal(jax.random.key(1), (2, m, 7)) * 2 + 0.5
  mask = None
  if mask_kind == 'keys':
    mask = jnp.arange(m)[None] < jnp.array([[m - 9], [4]])
  elif mask_kind == 'empty_row':
    mask = jnp.ones((2, 5, m), bool).at[1, 2].set(False)
  return q, kv, mask


def _cross_outputs_and_grads(f, params, q, kv, mask):
  """f's output and d sum(sin(output)) / d(params, q, kv)."""
  out = f.apply(params, None, q, kv, mask)
  loss = lambda p, q, kv: jnp.sum(jnp.sin(f.apply(p, None, q, kv, mask)))
  grads = jax.grad(loss, argnums=(0, 1, 2))(params, q, kv)
  # b_k gets no gradient (it cancels in the softmax).
  grads[0]['cross/~/attention/~/key']['b'] = 0.0 * grads[0][
      'cross/~/attention/~/key']['b']
  return out, grads


@functools.lru_cache(maxsize=None)
def _direct_cross(mask_kind):
  """(params, output, gradients) of the direct cross-attend on _data():
  the same for every formulation compared with it."""
  q, kv, mask = _data(mask_kind=mask_kind)
  direct = _cross('direct')
  params = direct.init(jax.random.key(2), q, kv, mask)
  # Non-zero biases, so the bias arguments of the reformulation are tested.
  params = jax.tree.map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape),
      params)
  return (params,) + _cross_outputs_and_grads(direct, params, q, kv, mask)


# chunk_size=37 (= M) is not listed: it takes the unchunked path of
# chunk_size=None (ops chunk only when chunk_size < M).
@pytest.mark.parametrize('formulation, chunk_size', [
    ('reformulated', None), ('direct', 8), ('reformulated', 8),
    ('direct', 5)])
@pytest.mark.parametrize('mask_kind', [None, 'keys', 'empty_row'])
def test_outputs_and_gradients_match_direct(formulation, chunk_size,
                                            mask_kind):
  q, kv, mask = _data(mask_kind=mask_kind)
  params, want_out, want = _direct_cross(mask_kind)
  got_out, got = _cross_outputs_and_grads(_cross(formulation, chunk_size),
                                          params, q, kv, mask)
  _assert_close(got_out, want_out)
  _assert_close(got, want)


def test_fully_masked_query_gives_zero_attention():
  q, kv, mask = _data(mask_kind='empty_row')
  out = hk.transform(lambda q, kv, m: attention.Attention(
      num_heads=1, formulation='reformulated', name='a')(
          q, kv, is_training=False, mask=m))
  params = out.init(jax.random.key(0), q, kv, mask)
  no_attention = params['a/~/output']['b']
  np.testing.assert_allclose(out.apply(params, None, q, kv, mask)[1, 2],
                             no_attention, atol=1e-6)


def test_auto_picks_the_cheaper_formulation():
  costs = attention.formulation_costs(
      num_queries=512, num_inputs=50176, input_channels=261, qk_channels=261,
      v_channels=261)
  assert costs['reformulated'] < costs['direct']
  small = attention.formulation_costs(
      num_queries=512, num_inputs=64, input_channels=261, qk_channels=261,
      v_channels=261)
  assert small['direct'] < small['reformulated']
  attn = hk.transform(lambda: [
      attention.Attention(num_heads=h, formulation='auto').formulation(
          512, m, 261) for h, m in ((1, 50176), (1, 64), (2, 50176))])
  assert attn.apply(attn.init(None), None) == [
      'reformulated', 'direct', 'direct']


def test_reformulated_needs_one_head():
  with pytest.raises(ValueError, match='num_heads=1'):
    hk.transform(lambda: attention.Attention(
        num_heads=2, formulation='reformulated')).init(None)


def _encoder_inputs():
  return jax.random.normal(jax.random.key(0), (2, 50, 6))


def _encoder(**kwargs):
  return hk.transform(lambda x: perceiver.PerceiverEncoder(
      num_latents=4, latent_dim=8, num_cross_attends=3,
      num_self_attends_per_block=1, num_self_heads=2, name='encoder',
      **kwargs)(x, is_training=False))


def _encoder_outputs_and_grads(f, params, compile_once=False):
  """f's latents and d sum(latents^2) / d params.

  compile_once: jit each (for hk.remat, which eagerly traces and compiles
  its blocks on every call; other modules run faster op by op).
  """
  x = _encoder_inputs()
  maybe_jit = jax.jit if compile_once else (lambda fn: fn)
  out = maybe_jit(f.apply)(params, None, x)
  grads = maybe_jit(jax.grad(
      lambda p: jnp.sum(f.apply(p, None, x) ** 2)))(params)
  for name in grads:  # b_k cancels in the softmax.
    if name.endswith('attention/~/key'):
      grads[name]['b'] = 0.0 * grads[name]['b']
  return out, grads


@functools.lru_cache(maxsize=None)
def _paper_encoder():
  """(params, latents, gradients) of the paper's formulation, which every
  variant is compared with."""
  paper = _encoder(cross_attention='direct', reuse_shared_inputs=False)
  params = paper.init(jax.random.key(1), _encoder_inputs())
  return (params,) + _encoder_outputs_and_grads(paper, params)


@pytest.mark.parametrize('kwargs', [
    dict(reuse_shared_inputs=False),
    dict(cross_attention='direct'),
    dict(cross_attention='reformulated', cross_attention_chunk_size=16),
    dict(remat=True),
])
def test_encoder_variants_match_the_paper_formulation(kwargs):
  params, want_out, want = _paper_encoder()
  got_out, got = _encoder_outputs_and_grads(
      _encoder(**kwargs), params, compile_once=kwargs.get('remat', False))
  _assert_close(got_out, want_out)
  _assert_close(got, want)


def _reference_cross_attend(p, q, kv):
  """P1's cross-attend written out: LN, projections, softmax, MLP (1 head)."""
  def ln(x, name):
    mean, var = jnp.mean(x, -1, keepdims=True), jnp.var(x, -1, keepdims=True)
    return ((x - mean) / jnp.sqrt(var + 1e-5) * p[f'cross/~/{name}']['scale']
            + p[f'cross/~/{name}']['offset'])

  def dense(x, name):
    return x @ p[f'cross/~/{name}']['w'] + p[f'cross/~/{name}']['b']

  qn, kvn = ln(q, 'query_norm'), ln(kv, 'input_norm')
  query = dense(qn, 'attention/~/query')
  key, value = dense(kvn, 'attention/~/key'), dense(kvn, 'attention/~/value')
  logits = query @ jnp.swapaxes(key, 1, 2) / np.sqrt(query.shape[-1])
  x = q + dense(jax.nn.softmax(logits) @ value, 'attention/~/output')
  mlp = lambda x, name: x @ p[f'cross/~/mlp/{name}']['w'] + p[
      f'cross/~/mlp/{name}']['b']  # hk.Linear names.
  return x + mlp(jax.nn.gelu(mlp(ln(x, 'mlp_norm'), 'hidden')), 'output')


@pytest.mark.parametrize('formulation', ['direct', 'reformulated'])
def test_folded_input_norm_matches_the_written_out_cross_attend(formulation):
  q, kv, _ = _data()
  module = _cross(formulation)
  params = module.init(jax.random.key(2), q, kv, None)
  # Scales away from 1 and offsets away from 0, so the fold is exercised.
  params = jax.tree.map(
      lambda p: p + 0.3 * jax.random.normal(jax.random.key(3), p.shape),
      params)
  _assert_close(module.apply(params, None, q, kv, None),
                _reference_cross_attend(params, q, kv))
  loss = lambda f: lambda p: jnp.sum(jnp.sin(f(p)))
  got = jax.grad(loss(lambda p: module.apply(p, None, q, kv, None)))(params)
  want = jax.grad(loss(lambda p: _reference_cross_attend(p, q, kv)))(params)
  for tree in (got, want):  # b_k cancels in the softmax.
    del tree['cross/~/attention/~/key']['b']
  _assert_close(got, want)


def _split_inputs(m=300):
  keys = jax.random.split(jax.random.key(4))
  return byte_array.SplitByteArray(
      jax.random.normal(keys[0], (2, m, 3)) * 2 + 0.5,
      jax.random.uniform(keys[1], (m, 10), minval=-1, maxval=1))


@pytest.mark.parametrize('formulation', ['reformulated', 'direct'])
@pytest.mark.parametrize('backend', ['cpu', 'reference'])
@pytest.mark.parametrize('masked', [False, True])
def test_split_inputs_match_the_dense_byte_array(formulation, backend, masked):
  """Outputs and gradients (parameters, queries and the per-example
  features, as a learned preprocessor would need) as from the built array."""
  split = _split_inputs()
  q = jax.random.normal(jax.random.key(0), (2, 5, 16))
  mask = (jnp.arange(300)[None] < jnp.array([[250], [30]])) if masked else None
  module = _cross(formulation)
  params = module.init(jax.random.key(2), q, split.dense(), mask)
  params = jax.tree.map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape),
      params)

  def loss(p, q, features, as_split):
    x = byte_array.SplitByteArray(features, split.shared)
    x = x if as_split else x.dense()
    with ops.use_backend(backend):
      return jnp.sum(jnp.sin(module.apply(p, None, q, x, mask)))

  got, want = (jax.jit(jax.value_and_grad(loss, (0, 1, 2)), static_argnums=3)(
      params, q, split.features, as_split) for as_split in (True, False))
  for _, (grads, *_) in (got, want):  # b_k cancels in the softmax.
    del grads['cross/~/attention/~/key']['b']
  _assert_close(got, want)


def test_encoder_never_builds_the_split_byte_array():
  """The compiled forward pass and parameter gradient of a P1-style encoder
  on split inputs call the standardised kernels and hold no [B, M, C]
  array."""
  split = _split_inputs(m=512)
  encoder = hk.transform(lambda x: perceiver.PerceiverEncoder(
      num_latents=4, latent_dim=8, num_cross_attends=2,
      num_self_attends_per_block=1, num_self_heads=2, name='encoder')(
          x, is_training=False))
  params = encoder.init(jax.random.key(1), split)
  hlo = jax.jit(encoder.apply).lower(params, None, split).compile().as_text()
  assert hlo.count(cpu_attention.STANDARDIZED_FORWARD_TARGET) == 2
  assert 'f32[2,512,13]' not in hlo
  grad = jax.grad(lambda p, x: jnp.sum(encoder.apply(p, None, x) ** 2))
  hlo = jax.jit(grad).lower(params, split).compile().as_text()
  assert hlo.count(cpu_attention.STANDARDIZED_BACKWARD_TARGET) == 2
  assert 'f32[2,512,13]' not in hlo
  dense_hlo = jax.jit(encoder.apply).lower(
      params, None, split.dense()).compile().as_text()
  assert 'f32[2,512,13]' in dense_hlo  # What the check would catch.
  _assert_close(encoder.apply(params, None, split),
                encoder.apply(params, None, split.dense()))
