"""The GPU ops' choice of cuDNN flash attention (runs need a GPU: see
scripts/device_check.sh); on this CPU host, that the backend stays out."""

import jax
import jax.numpy as jnp
import pytest

from perceiver_jax import ops
from perceiver_jax.ops import gpu


def _spec(shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize('q, v, mask, max_width, want', [
    # P1/P2 latent self-attention: 8 heads x 128.
    ((8, 512, 8, 128), (8, 512, 8, 128), None, 128, 128),
    # Widths padded up to a multiple of 8, V to the same D.
    ((8, 512, 8, 13), (8, 512, 8, 5), None, 128, 16),
    # P1 ImageNet's one-head cross-attention: 261 channels.
    ((8, 512, 1, 261), (8, 50176, 1, 261), None, 256, 'exceeds'),
    ((8, 512, 8, 200), (8, 512, 8, 200), None, 256, 200),
    ((8, 512, 8, 200), (8, 512, 8, 200), None, 128, 'exceeds'),
    ((8, 512, 8, 128), (8, 512, 8, 128), jnp.ones((8, 1, 1, 512), bool), 128,
     'masked'),
])
def test_cudnn_width(q, v, mask, max_width, want):
  got = gpu.cudnn_width(_spec(q), _spec(v), mask, max_width)
  if isinstance(want, str):
    assert isinstance(got, str) and want in got
  else:
    assert got == want


def test_float32_runs_the_reference():
  got = gpu.cudnn_width(_spec((2, 4, 1, 8), jnp.float32),
                        _spec((2, 4, 1, 8), jnp.float32), None, 128)
  assert 'bfloat16 or float16' in got


def test_no_cuda_backend_without_cuda_devices():
  q = jnp.ones((2, 3, 1, 8))
  ops.attention(q, q, q)  # Loads every platform's backend module.
  assert 'cuda' not in ops._registered  # pylint: disable=protected-access
