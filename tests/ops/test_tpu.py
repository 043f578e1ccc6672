"""The TPU ops (Pallas flash attention) in interpret mode on CPU, against
the reference: outputs and gradients, masked and not, bf16 and f32, on the
shape families of the paper configs (sizes shrunk)."""

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax import ops
from perceiver_jax.ops import reference
from perceiver_jax.ops import tpu

# (batch, N, M, heads, K, V): the families the paper configs use.
SHAPES = {
    # Latent self-attention, 8 heads (P1/P2: 512 or 1024 latents, K = 128).
    'self_attention': (2, 16, 16, 8, 16, 16),
    # One-head cross-attention to the byte array (P1 ImageNet: C = 261,
    # M = 50,176), M not a multiple of the kernel's blocks.
    'cross_attention': (2, 8, 300, 1, 13, 13),
    # P2's classification decoder: one query over the latents.
    'query_decoder': (2, 1, 32, 1, 24, 24),
}
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}


def _operands(shape, dtype, seed=0):
  batch, n, m, heads, qk, width = shape
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=s), dtype) for s in (
      (batch, n, heads, qk), (batch, m, heads, qk), (batch, m, heads, width)))


def _ready(x):
  """Waits for an interpret-mode result. Its kernel runs host callbacks
  that call into JAX themselves; work dispatched meanwhile on the same
  device can deadlock with them."""
  return jax.block_until_ready(x)


def _loss(attend, mask):
  return lambda q, k, v: jnp.sum(jnp.sin(
      attend(q, k, v, mask, scale=0.3).astype(jnp.float32)))


def _assert_close(got, want, dtype):
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    x, y = (np.asarray(a, np.float32) for a in (x, y))
    scale = max(np.abs(y).max(), 1.0)
    assert np.abs(x - y).max() / scale < TOLERANCE[dtype]


@pytest.mark.slow
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('family', sorted(SHAPES))
def test_flash_attention_matches_the_reference(family, dtype):
  shape = SHAPES[family]
  q, k, v = _operands(shape, dtype)
  batch, n, m = shape[:3]
  # Example 0 sees its first keys only, example 1 none (zeros out).
  mask = ops.check_mask(jnp.arange(m)[None] < jnp.array([[m // 2 + 1], [0]]),
                        batch, n, m)
  for maybe_mask in (None, mask):
    with pltpu.force_tpu_interpret_mode():
      got = _ready(tpu.attention(q, k, v, maybe_mask, scale=0.3))
      got_grads = _ready(jax.grad(_loss(tpu.attention, maybe_mask),
                                  (0, 1, 2))(q, k, v))
    want = reference.attention(q, k, v, maybe_mask, scale=0.3)
    want_grads = jax.grad(_loss(reference.attention, maybe_mask), (0, 1, 2))(
        q, k, v)
    assert got.dtype == want.dtype and got.shape == want.shape
    _assert_close(got, want, dtype)
    _assert_close(got_grads, want_grads, dtype)
  np.testing.assert_array_equal(np.asarray(got[1], np.float32), 0.0)


@pytest.mark.slow
def test_attend_to_inputs_reads_split_byte_arrays():
  """The reformulated cross-attention's one-head attention to a
  standardised byte array held in parts."""
  keys = jax.random.split(jax.random.key(0), 3)
  split = ops.byte_array.SplitByteArray(
      jax.random.normal(keys[0], (2, 200, 3)),
      jax.random.uniform(keys[1], (200, 10)))
  inputs = ops.standardize(split, 1e-5)
  q = jax.random.normal(keys[2], (2, 4, 13))
  with pltpu.force_tpu_interpret_mode():
    got = _ready(tpu.attend_to_inputs(q, inputs, None, scale=0.3))
  want = reference.attend_to_inputs(q, inputs, None, scale=0.3)
  _assert_close(got, want, jnp.float32)


def test_per_query_masks_run_the_reference():
  q, k, v = _operands((2, 3, 32, 1, 24, 24), jnp.float32)
  mask = ops.check_mask(jnp.ones((2, 3, 32), bool), 2, 3, 32)  # [B, N, M]
  assert not tpu.kernel_applies(mask, 3)
  key_mask = ops.check_mask(jnp.ones((2, 32), bool), 2, 3, 32)  # [B, M]
  assert tpu.kernel_applies(key_mask, 3)
  assert tpu.kernel_applies(None, 3)
  # No Pallas call is traced: the reference runs (and runs on CPU).
  np.testing.assert_allclose(tpu.attention(q, k, v, mask, scale=0.3),
                             reference.attention(q, k, v, mask, scale=0.3))
