"""Tests for the attention and MLP blocks (the ops: tests/ops)."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax.modules import attention


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
