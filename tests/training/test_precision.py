"""Tests for perceiver_jax.training.precision (haiku mixed-precision policy)."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax.training import precision


class _Model(hk.Module):
  """Linear -> LayerNorm -> Linear, standing in for a top-level model."""

  def __call__(self, x):  # [B, C]
    x = hk.Linear(8, name='hidden')(x)
    x = hk.LayerNorm(-1, True, True, name='norm')(x)
    return hk.Linear(3, name='logits')(x)


@pytest.fixture(autouse=True)
def _clear_policies():
  precision.apply_policy('float32', [_Model])
  yield
  precision.apply_policy('float32', [_Model])


def _run(x):
  """Params, output, and (class, input dtype, output dtype) of each call."""
  calls = []

  def spy(next_f, args, kwargs, context):
    out = next_f(*args, **kwargs)
    if context.method_name == '__call__':
      # Runs inside the policy's casts: sees what the module computes in.
      calls.append((type(context.module).__name__, args[0].dtype, out.dtype))
    return out

  def forward(inputs):
    with hk.intercept_methods(spy):
      return _Model(name='model')(inputs)

  transformed = hk.transform(forward)
  params = transformed.init(jax.random.PRNGKey(0), x)
  calls.clear()
  out = transformed.apply(params, None, x)
  return params, out, calls


def test_bfloat16_policy():
  precision.apply_policy('bfloat16', [_Model])
  params, out, calls = _run(jnp.ones([2, 4], jnp.float32))
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == jnp.float32
  assert out.dtype == jnp.float32
  assert calls == [('Linear', jnp.bfloat16, jnp.bfloat16),
                   ('LayerNorm', jnp.float32, jnp.float32),
                   ('Linear', jnp.bfloat16, jnp.bfloat16),
                   ('_Model', jnp.bfloat16, jnp.bfloat16)]


def test_bfloat16_gradients_are_float32_and_close():
  x = jax.random.normal(jax.random.PRNGKey(1), [2, 4])
  params, out32, _ = _run(x)
  precision.apply_policy('bfloat16', [_Model])
  _, out16, _ = _run(x)
  np.testing.assert_allclose(out16, out32, atol=5e-2)
  assert not np.array_equal(out16, out32)  # Really computed in bf16.

  forward = hk.transform(lambda v: _Model(name='model')(v))
  grads = jax.grad(lambda p: jnp.sum(forward.apply(p, None, x)))(params)
  for leaf in jax.tree.leaves(grads):
    assert leaf.dtype == jnp.float32


def test_float32_clears_the_policy():
  precision.apply_policy('bfloat16', [_Model])
  precision.apply_policy('float32', [_Model])
  assert hk.mixed_precision.get_policy(_Model) is None
  assert hk.mixed_precision.get_policy(hk.LayerNorm) is None
  _, out, calls = _run(jnp.ones([2, 4], jnp.float32))
  assert out.dtype == jnp.float32
  assert all(c[1] == jnp.float32 and c[2] == jnp.float32 for c in calls)


def test_model_policy():
  policy = precision.model_policy('bfloat16')
  assert policy.param_dtype == jnp.float32
  assert policy.compute_dtype == jnp.bfloat16
  assert policy.output_dtype == jnp.float32
  assert precision.model_policy('float32').compute_dtype == jnp.float32


@pytest.mark.parametrize('dtype, classes, match', [
    ('float16', [_Model], 'Unknown compute dtype'),
    ('bf16', [_Model], 'Unknown compute dtype'),
    ('bfloat16', [], 'at least one'),
    ('bfloat16', [int], 'hk.Module'),
])
def test_errors(dtype, classes, match):
  with pytest.raises(ValueError, match=match):
    precision.apply_policy(dtype, classes)


@pytest.mark.parametrize('platform, want', [
    ('cpu', 'float32'), ('gpu', 'bfloat16'), ('tpu', 'bfloat16')])
def test_auto_is_bfloat16_on_accelerators_only(platform, want):
  assert precision.resolve('auto', platform) == want
  for name in ('float32', 'bfloat16'):
    assert precision.resolve(name, platform) == name


def test_unresolved_or_unknown_precisions_are_rejected():
  with pytest.raises(ValueError, match="Unknown precision 'fp16'"):
    precision.resolve('fp16', 'cpu')
  with pytest.raises(ValueError, match="resolve 'auto' first"):
    precision.model_policy('auto')
