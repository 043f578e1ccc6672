"""Two processes on 127.0.0.1 (jax.distributed, gloo) train as one."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests import helpers


@pytest.mark.slow
def test_two_processes_share_gradients_and_read_different_shards(tmp_path):
  port = helpers.free_port()
  worker = os.path.join(os.path.dirname(__file__), 'multihost_worker.py')
  env = dict(os.environ, PYTHONPATH=helpers.ROOT)
  env.pop('XLA_FLAGS', None)
  procs = [subprocess.Popen(
      [sys.executable, worker, str(port), '2', str(i), str(tmp_path)],
      env=env, cwd=helpers.ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  a, b = (np.load(tmp_path / f'process_{i}.npz') for i in range(2))
  assert int(a['devices']) == int(b['devices']) == 4
  # Each process read its own shard of the data...
  assert not np.array_equal(a['labels'], b['labels'])
  # ...yet both end with identical parameters and the same global loss.
  params = sorted(k for k in a.files if k.startswith('arr_'))
  assert params
  for key in params:
    np.testing.assert_array_equal(a[key], b[key])
  assert float(a['loss']) == float(b['loss'])
