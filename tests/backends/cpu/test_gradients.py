"""The CPU backend's written-out gradients against JAX's own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax import ops
from perceiver_jax.backends.cpu import gradients
from tests import helpers


@pytest.fixture(autouse=True)
def _cpu_backend():
  helpers.require_cpu_backend()


def _loss(f):
  return lambda *args: jnp.sum(jnp.sin(f(*args)) * 3.0)


@pytest.mark.parametrize('masked', [False, True])
def test_one_head_layouts_agree(masked):
  """One head: logits held keys-major [B, M, N] or query-major [B, N, M]
  give the same outputs and gradients."""
  rng = np.random.default_rng(4)
  q, k = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 6, 4))
  v = rng.normal(size=(2, 6, 5))
  q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
  mask = None
  if masked:
    mask = ops.check_mask(
        jnp.array([[1, 1, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0]], bool), 2, 3,
        6)[:, 0]  # [B, 1, M]

  def attend(keys_major):
    return lambda q, k, v: gradients.attend(q, k, v, mask, 0.5, keys_major)

  np.testing.assert_allclose(attend(True)(q, k, v), attend(False)(q, k, v),
                             atol=1e-6)
  got = jax.grad(_loss(attend(True)), (0, 1, 2))(q, k, v)
  want = jax.grad(_loss(attend(False)), (0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5)


@pytest.mark.parametrize('argnums', [(0, 1, 2), (0,), (1,), (2,)])
def test_linear_and_layer_norm_match_the_reference(argnums):
  rng = np.random.default_rng(3)
  x, w, b = (jnp.asarray(rng.normal(size=s), jnp.float32)
             for s in ((2, 3, 4), (4, 5), (5,)))
  for ours, reference, args in (
      (gradients.linear, ops.reference.linear, (x, w, b)),
      (lambda x, s, o: gradients.layer_norm(x, s, o, 1e-5),
       lambda x, s, o: ops.reference.layer_norm(x, s, o, 1e-5),
       (x * 3 + 1, w[:, 0], b[:4]))):
    np.testing.assert_allclose(ours(*args), reference(*args), atol=1e-5)
    got = jax.grad(_loss(ours), argnums)(*args)
    want = jax.grad(_loss(reference), argnums)(*args)
    for g, r in zip(got, want):
      np.testing.assert_allclose(g, r, atol=1e-4)


def test_weight_gradient_runs_through_openblas():
  x, w, b = jnp.ones((2, 3, 4)), jnp.ones((4, 5)), jnp.ones(5)
  hlo = jax.jit(jax.grad(_loss(gradients.linear), 1)).lower(
      x, w, b).as_text()
  assert 'perceiver_jax_cpu_matmul' in hlo
