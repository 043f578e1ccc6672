"""The seam between the model and the backends: who imports what, and how a
backend that cannot load is handled."""

import logging
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax import ops
from perceiver_jax.backends.cpu import native
from tests import helpers

_PACKAGE = pathlib.Path(ops.__file__).parents[1]


def test_the_model_never_names_a_backend_or_a_platform():
  sources = sorted((_PACKAGE / 'modules').glob('*.py')) + [
      _PACKAGE / 'models.py']
  for path in sources:
    text = path.read_text()
    for word in ('backends', 'kernels', 'default_backend'):
      assert word not in text, f'{path.name} mentions {word!r}'


def test_the_reference_backend_never_loads_the_cpu_backend():
  """A model built and run with backend='reference' does not import it."""
  script = '''
import sys, jax
from tests import test_configs
from perceiver_jax import models
config = test_configs._load('imagenet.py', 'debug').experiment_kwargs.config
config.model.backend = 'reference'
forward = models.make_forward(config.model)
x = jax.numpy.ones((1, 16, 16, 3))
params = forward.init(jax.random.key(0), x, is_training=False)
forward.apply(params, None, x, is_training=False)
print(sorted(m for m in sys.modules if m.startswith('perceiver_jax.back')))
'''
  out = subprocess.run([sys.executable, '-c', script], cwd=helpers.ROOT,
                       capture_output=True, text=True, check=True).stdout
  assert out.strip().splitlines()[-1] == '[]'


@pytest.fixture
def broken_cpu_backend(monkeypatch):
  """The CPU backend as on a host without a compiler: its import fails."""
  def fail():
    raise native.BuildError('no C++ compiler')
  monkeypatch.setattr(native, 'register', fail)
  monkeypatch.delitem(sys.modules, 'perceiver_jax.backends.cpu.backend',
                      raising=False)
  monkeypatch.setattr(ops, '_registered', {})
  monkeypatch.setattr(ops, '_load_errors', {})


def test_a_backend_that_does_not_build_falls_back_with_one_warning(
    broken_cpu_backend, caplog):
  del broken_cpu_backend
  q = jax.random.normal(jax.random.key(0), (2, 3, 1, 4))
  with caplog.at_level(logging.WARNING):
    got = [ops.attention(q, q, q) for _ in range(3)]
  with ops.use_backend('reference'):
    want = ops.attention(q, q, q)
  for out in got:
    np.testing.assert_allclose(out, want)
  warnings = [r for r in caplog.records if 'cpu backend is unavailable' in
              r.getMessage()]
  assert len(warnings) == 1 and 'no C++ compiler' in warnings[0].getMessage()
  hlo = jax.jit(lambda q: ops.attention(q, q, q)).lower(q).as_text()
  assert 'perceiver_jax_cpu' not in hlo


def test_a_backend_asked_for_by_name_must_load(broken_cpu_backend):
  del broken_cpu_backend
  x = jnp.ones((2, 3))
  with ops.use_backend('cpu'), pytest.raises(
      ops.BackendUnavailable, match="'cpu' was asked for.*no C\\+\\+ compiler"):
    ops.linear(x, jnp.ones((3, 4)), jnp.zeros(4))


def test_unknown_backend_names_are_rejected():
  with pytest.raises(ValueError, match="Unknown backend 'blas'"):
    with ops.use_backend('blas'):
      pass
