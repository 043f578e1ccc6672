"""Test set-up: 8 fake CPU devices, quiet TensorFlow, no GPU for TF."""

import os
import tempfile

import pytest

# Must happen before JAX or TensorFlow initialise a backend.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') +
    ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
# One persistent compilation cache for the whole run: the xdist workers and
# the scripts the tests start inherit it, so the many tests that train the
# same small config compile its steps once. Fresh per run unless the caller
# names a folder.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(
      prefix='perceiver_jax_test_xla_cache_')


def pytest_configure(config):
  # jaxline reads absl flags (with their defaults) inside train/evaluate.
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  config.addinivalue_line(
      'markers', 'slow: end-to-end tests that take more than ~20 s.')


@pytest.fixture(autouse=True)
def _close_checkpointers(monkeypatch):
  """Closes every DiskCheckpointer a test makes (directly, by factory or in a
  training loop): orbax's asyncio machinery would otherwise be collected in a
  later test, after its event loop has closed (an unraisable exception)."""
  # pylint: disable-next=g-import-not-at-top
  from perceiver_jax.training import checkpointing
  made = []

  class Recorded(checkpointing.DiskCheckpointer):

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      made.append(self)

  monkeypatch.setattr(checkpointing, 'DiskCheckpointer', Recorded)
  yield
  for checkpointer in made:
    checkpointer.close()
