"""gs:// checkpoints and TensorBoard logs, against a local GCS emulator.

See tests/gcs_emulator.py for which libraries honour an endpoint setting (and
why tfds's tf.data reads of gs:// tfrecords cannot be tested here).
"""

import json
import os
import subprocess
import sys

import pytest

from perceiver_jax.training import checkpointing
from perceiver_jax.training import run_lock
from perceiver_jax.training import tensorboard
from tests import gcs_emulator
from tests import helpers
from tests.gcs_emulator import gcs_env  # pylint: disable=unused-import
from tests.gcs_emulator import gcs_url  # pylint: disable=unused-import

_DIGITS = os.path.join(helpers.ROOT, 'configs', 'digits.py') + ':debug'


def test_tensorboard_events_round_trip_through_gcs(gcs_env, gcs_url):
  del gcs_env
  log_dir = f'gs://{gcs_emulator.BUCKET}/tb/train'
  writer = tensorboard.EventFileWriter(log_dir)
  writer.write_scalars(1, {'loss': 2.0, 'top_1_acc': 0.25})
  writer.write_scalars(2, {'loss': 1.0})
  names = gcs_emulator.list_objects(gcs_url, 'tb/train/')
  assert names == ['tb/train/' + writer.path.name]
  assert tensorboard.read_scalars(log_dir) == {
      'loss': [(1, 2.0), (2, 1.0)], 'top_1_acc': [(1, 0.25)]}


def _script(name, *flags, env):
  return subprocess.run(
      [sys.executable, os.path.join(helpers.ROOT, 'scripts', name),
       f'--config={_DIGITS}', *flags],
      env=dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS='--xla_force_host_platform_device_count=2', **env),
      cwd=helpers.ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_resume_and_evaluate_through_gcs(gcs_env, gcs_url):
  run = f'gs://{gcs_emulator.BUCKET}/runs/digits'
  first = _script('train.py', f'--config.checkpoint_dir={run}',
                  '--config.training_steps=4', env=gcs_env)
  assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
  names = gcs_emulator.list_objects(gcs_url, 'runs/digits/')
  assert any('/4/' in name for name in names), names
  assert any('train/events.out.tfevents.' in name for name in names), names
  assert int(checkpointing.restore_checkpoint(run)['global_step']) == 4

  # Extending the run resumes from step 4 in the bucket.
  second = _script('train.py', f'--config.checkpoint_dir={run}',
                   '--config.training_steps=6', '--allow_config_change',
                   env=gcs_env)
  assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
  # gcsfs caches listings in this process (TensorFlow's client does not).
  gcs_emulator.forget_listings()
  assert checkpointing.list_steps(run)[-2:] == [4, 6]
  steps = [s for s, _ in tensorboard.read_scalars(f'{run}/train')['loss']]
  assert steps and min(steps) >= 1 and max(steps) <= 6
  assert all(step > 4 for step in steps[len(steps) // 2:]), steps

  evaluated = _script('evaluate.py', f'--checkpoint={run}', env=gcs_env)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
  assert metrics['step'] == 6
  assert 0.0 <= metrics['top_1_acc'] <= 1.0


def test_run_lock_on_gcs_refuses_a_second_run(gcs_env, gcs_url):
  del gcs_env
  directory = f'gs://{gcs_emulator.BUCKET}/locked'
  with run_lock.RunLock(directory, command='train.py A'):
    assert gcs_emulator.list_objects(gcs_url, 'locked/') == ['locked/run.lock']
    with pytest.raises(run_lock.RunLockError, match=r'train.py A'):
      run_lock.RunLock(directory).acquire()
  gcs_emulator.forget_listings()
  assert gcs_emulator.list_objects(gcs_url, 'locked/') == []
