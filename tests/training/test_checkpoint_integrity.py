"""Checkpoint integrity: bit rot, NaN steps, transient errors, full disks.

Each test is a repro of issue 27 written as the expected behaviour.
"""

import errno
import json
import logging
import os
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from perceiver_jax.training import checkpoint_integrity as integrity
from perceiver_jax.training import checkpointing
from perceiver_jax.training import jaxline_compat
from perceiver_jax.training import tree_io
from tests.training import test_checkpointing as helpers

jaxline = jaxline_compat.import_jaxline()

def _largest_data_file(step_dir) -> str:
  """As in the issue: the largest file of the arrays' OCDBT data."""
  data = step_dir / 'state' / 'ocdbt.process_0' / 'd'
  return max((str(data / name) for name in os.listdir(data)),
             key=os.path.getsize)


def _flip(path: str, offset: int, nbytes: int) -> None:
  """Flips bit 3 of one byte, or every bit of `nbytes` bytes."""
  with open(path, 'r+b') as f:
    f.seek(offset)
    data = bytearray(f.read(nbytes))
    for i in range(len(data)):
      data[i] ^= 0x08 if nbytes == 1 else 0xFF
    f.seek(offset)
    f.write(bytes(data))


def _two_steps(tmp_path, num_weights=4, **overrides):
  """Saves steps 2 and 4 of params {'linear': {'w': [num_weights]}}."""
  config = helpers._config(tmp_path, **overrides)
  checkpointer = checkpointing.make_checkpointer(config, 'train')
  experiment = helpers._Experiment('train', jax.random.PRNGKey(0))
  params = {'linear': {'w': np.random.RandomState(0).randn(
      num_weights).astype(np.float32)}}
  experiment.params = jaxline.utils.bcast_local_devices(params)
  experiment.opt_state = jaxline.utils.bcast_local_devices(
      helpers._OPTIMIZER.init(params))
  helpers._save(checkpointer, 2, experiment)
  helpers._save(checkpointer, 4, experiment)
  return config


@pytest.mark.parametrize('nbytes', [1, 8])
def test_flipped_bits_are_detected_at_restore_and_evaluate(tmp_path, nbytes):
  # Large enough that the arrays' bytes are stored as they are (tiny ones
  # share a compressed block whose decoder would notice the flip too).
  config = _two_steps(tmp_path, num_weights=1 << 15)
  latest = tmp_path / 'latest'
  path = _largest_data_file(latest / '4')
  _flip(path, os.path.getsize(path) // 2, nbytes)
  # evaluate.py's path: step 4 by name fails, naming step, array and file...
  with pytest.raises(integrity.CorruptCheckpointError,
                     match=r'latest/4 is corrupt: checksum mismatch in 1 '
                     r'array\(s\) \(experiment_module/.*/linear/w\); their '
                     rf'data is in {path}.*latest/2'):
    checkpointing.restore_checkpoint(latest / '4')
  # ...and the directory gives the previous good step.
  assert checkpointing.restore_checkpoint(tmp_path)['global_step'] == 2
  # Training restores step 2 and moves step 4 aside.
  restorer = checkpointing.make_checkpointer(config, 'train')
  state = helpers._fresh_state(restorer)
  restorer.restore('latest')
  assert state.global_step == 2
  assert [n for n in os.listdir(latest) if n.startswith('4.corrupt-')]
  # Its manager forgot step 4 (reload), so training can save it afresh.
  helpers._save(restorer, 4)
  assert checkpointing.list_steps(tmp_path) == [2, 4]
  assert checkpointing.restore_checkpoint(tmp_path)['global_step'] == 4


def test_checksum_mismatch_names_the_step_the_array_and_the_file(tmp_path):
  """A change the decoder cannot see (here: the recorded checksum of one
  array) is caught by the checksums alone."""
  _two_steps(tmp_path)
  meta_file = tmp_path / 'latest' / '4' / 'meta' / 'metadata'
  meta = json.loads(meta_file.read_text())
  leaf = 'experiment_module/params/linear/w'
  crc, rest = meta['checksums'][leaf].split(' ', 1)
  meta['checksums'][leaf] = f'{int(crc, 16) ^ 1:08x} {rest}'
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(integrity.CorruptCheckpointError,
                     match=rf'latest/4 is corrupt: checksum mismatch in 1 '
                     rf'array\(s\) \({leaf}\); their data is in .*/d/'):
    checkpointing.restore_checkpoint(tmp_path / 'latest' / '4')
  assert checkpointing.restore_checkpoint(tmp_path)['global_step'] == 2


def test_checkpoints_without_checksums_still_load(tmp_path, monkeypatch,
                                                  caplog):
  caplog.set_level(logging.INFO)
  monkeypatch.setattr(integrity, 'checksums', lambda tree: None)
  _two_steps(tmp_path)
  monkeypatch.undo()
  assert checkpointing.restore_checkpoint(tmp_path)['global_step'] == 4
  assert 'predates array checksums' in caplog.text


def test_non_finite_checkpoints_are_skipped(tmp_path):
  config = helpers._config(tmp_path)
  checkpointer = checkpointing.make_checkpointer(config, 'train')
  experiment = helpers._save(checkpointer, 2)
  experiment.params = jax.tree.map(lambda w: w * np.nan, experiment.params)
  helpers._save(checkpointer, 4, experiment)
  with pytest.raises(integrity.CorruptCheckpointError,
                     match=r'latest/4 holds non-finite values .*params/linear'):
    checkpointing.restore_checkpoint(tmp_path / 'latest' / '4')
  good = checkpointing.restore_checkpoint(tmp_path)
  assert good['global_step'] == 2
  assert np.isfinite(good['experiment_module']['params']['linear']['w']).all()
  restorer = checkpointing.make_checkpointer(config, 'train')
  state = helpers._fresh_state(restorer)
  restorer.restore('latest')
  assert state.global_step == 2
  assert [n for n in os.listdir(tmp_path / 'latest')
          if n.startswith('4.nonfinite-')]


def test_a_transient_read_error_is_retried_not_quarantined(tmp_path,
                                                           monkeypatch):
  config = _two_steps(tmp_path)
  monkeypatch.setattr(integrity, 'RETRY_DELAYS_S', (0.0, 0.0))
  real_restore = ocp.Checkpointer.restore
  calls = []

  def flaky(self, *args, **kwargs):
    calls.append(args[0])
    if len(calls) == 1:
      raise OSError(errno.EIO, 'Input/output error (network storage)')
    return real_restore(self, *args, **kwargs)

  monkeypatch.setattr(ocp.Checkpointer, 'restore', flaky)
  restorer = checkpointing.make_checkpointer(config, 'train')
  state = helpers._fresh_state(restorer)
  restorer.restore('latest')
  assert state.global_step == 4 and len(calls) == 2
  assert sorted(os.listdir(tmp_path / 'latest')) == ['2', '4']
  # Storage that stays down: the run stops, nothing is moved.
  monkeypatch.setattr(ocp.Checkpointer, 'restore', lambda *a, **k: (
      _ for _ in ()).throw(ValueError('UNAVAILABLE: GCS backend down')))
  with pytest.raises(integrity.UnavailableCheckpointError,
                     match='after 3 tries.*Nothing was moved'):
    checkpointing.make_checkpointer(config, 'train').restore('latest')
  assert sorted(os.listdir(tmp_path / 'latest')) == ['2', '4']


def test_all_steps_damaged_fails_then_refuses_a_fresh_start(tmp_path):
  config = _two_steps(tmp_path)
  for step in ('2', '4'):
    for root, _, names in os.walk(tmp_path / 'latest' / step / 'state'):
      for name in names:  # Every data file: a damaged disk.
        if os.path.basename(root) == 'd':
          os.truncate(os.path.join(root, name), 10)
  # Run 1: a clear failure naming both steps.
  run1 = checkpointing.make_checkpointer(config, 'train')
  helpers._fresh_state(run1)
  assert run1.can_be_restored('latest')
  with pytest.raises(integrity.CheckpointError,
                     match=r'No checkpoint in .*latest could be read.*'
                     r'latest/4.*latest/2'):
    run1.restore('latest')
  # Run 2 (what jaxline asks first): no silent start from step 0.
  run2 = checkpointing.make_checkpointer(config, 'train')
  with pytest.raises(integrity.CheckpointError,
                     match=r'Refusing to train from scratch.*4\.corrupt-.*'
                     r'--allow_fresh_start'):
    run2.can_be_restored('latest')
  config.checkpoint_allow_fresh_start = True
  assert not checkpointing.make_checkpointer(
      config, 'train').can_be_restored('latest')
  with pytest.raises(FileNotFoundError, match='moved aside'):
    checkpointing.restore_checkpoint(tmp_path)


def test_prunes_before_saving_and_names_the_space_a_save_needs(
    tmp_path, monkeypatch):
  config = helpers._config(tmp_path, max_checkpoints_to_keep=2)
  checkpointer = checkpointing.make_checkpointer(config, 'train')
  experiment = helpers._save(checkpointer, 1)
  helpers._save(checkpointer, 2, experiment)
  real_save = ocp.CheckpointManager.save
  on_disk_at_write = []

  def full_disk(manager, *args, **kwargs):
    on_disk_at_write.append(tree_io.complete_steps(manager.directory))
    if len(on_disk_at_write) > 1:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real_save(manager, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', full_disk)
  helpers._save(checkpointer, 3, experiment)
  # keep=2 and the disk held two: step 1 went before step 3 was written.
  assert on_disk_at_write[0] == [2]
  assert checkpointing.list_steps(tmp_path) == [2, 3]
  step_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in
                   os.walk(tmp_path / 'latest' / '3') for f in fs)
  with pytest.raises(integrity.CheckpointError) as error:
    helpers._save(checkpointer, 4, experiment)
  message = str(error.value)
  assert message.startswith(f'Disk full while saving checkpoint '
                            f'{tmp_path / "latest" / "4"}'), message
  assert f'({step_bytes:,} bytes)' in message
  assert 'No space left' in message and '\n' not in message


_FULL_DISK_TRAIN = """
import errno, runpy, sys
import orbax.checkpoint as ocp

def full_disk(*args, **kwargs):
  raise OSError(errno.ENOSPC, 'No space left on device')

ocp.CheckpointManager.save = full_disk
sys.argv = ['scripts/train.py'] + sys.argv[1:]
runpy.run_path('scripts/train.py', run_name='__main__')
"""


@pytest.mark.slow  # Starts scripts/train.py (TensorFlow, JAX): ~10-25 s.
def test_train_py_prints_the_disk_full_message_last(tmp_path):
  env = dict(os.environ, PYTHONPATH=helpers.helpers.ROOT, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # One CPU device: 8 fake ones compile slowly.
  run = subprocess.run(
      [sys.executable, '-c', _FULL_DISK_TRAIN,
       '--config=configs/digits.py:debug',
       f'--config.checkpoint_dir={tmp_path}'], env=env,
      cwd=helpers.helpers.ROOT, capture_output=True, text=True, timeout=300)
  out = (run.stdout + run.stderr).strip()
  assert run.returncode == 1, out[-3000:]
  last = out.splitlines()[-1]
  assert re.search(r'ERROR Disk full while saving checkpoint .*latest/20 .*'
                   r'No space left on device.*needs about [\d.]+ KiB '
                   r'\([\d,]+ bytes\)', last), out[-3000:]
  assert 'Traceback' not in out and 'Event loop' not in out, out[-3000:]
  assert not os.path.exists(tmp_path / 'run.lock')  # Released on failure.
