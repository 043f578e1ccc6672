"""Test set-up: 8 fake CPU devices, quiet TensorFlow, no GPU for TF."""

import os

# Must happen before JAX or TensorFlow initialise a backend.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') +
    ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')


def pytest_configure(config):
  # jaxline reads absl flags (with their defaults) inside train/evaluate.
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  config.addinivalue_line(
      'markers', 'slow: end-to-end tests that take more than ~20 s.')
