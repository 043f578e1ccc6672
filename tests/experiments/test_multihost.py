"""Two processes on 127.0.0.1 (jax.distributed, gloo) train as one, and stop
as one; their checkpoint evaluates and resumes on one host or two."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from perceiver_jax.training import checkpointing
from tests import helpers


def _script_env(num_devices: int) -> dict[str, str]:
  return helpers.multiprocess_environ(
      PYTHONPATH=helpers.ROOT, JAX_PLATFORMS='cpu',
      XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}')


def _digits_script(name, *flags, process=None, port=None):
  """scripts/<name> on digits debug with 2 CPU devices; as process
  `process` of 2 (coordinator on `port`) or alone when process is None."""
  if process is not None:
    flags += (f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
              f'--process_id={process}')
  return subprocess.Popen(
      [sys.executable, os.path.join(helpers.ROOT, 'scripts', name),
       '--config=' + os.path.join(helpers.ROOT, 'configs', 'digits.py') +
       ':debug', *flags],
      env=_script_env(2), cwd=helpers.ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return out, err


def _params(step_dir):
  return jax.tree.leaves(
      checkpointing.restore_checkpoint(step_dir)['experiment_module']['params'])


@pytest.mark.slow
def test_two_processes_share_gradients_read_different_shards_and_evaluate(
    tmp_path):
  """Also: the 2-host checkpoint they write (step 3) gives the same metrics
  from scripts/evaluate.py on 2 hosts as in training and on 1 host, and a
  1-host run resumes from it with the 2-host parameters.

  Why a different host count may resume: the checkpoint holds no per-host
  state. Params and optimizer state are replicated; train_step_rng is one
  key on every device of every host (jaxline folds the host and device in
  per step); the data position is global_step, from which each host's
  loader skips ahead in its own shard. What changes is only which examples
  the rest of the current epoch draws (shards follow the host count), as
  with any reshuffle; from the next epoch on each is seen once.
  """
  port = helpers.free_port()
  worker = os.path.join(os.path.dirname(__file__), 'multihost_worker.py')
  env = helpers.multiprocess_environ(PYTHONPATH=helpers.ROOT)
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
  # Evaluation over both hosts' shards counts each of the 300 test images
  # once, and both hosts report the same metrics.
  assert float(a['eval_count']) == float(b['eval_count']) == 300
  for key in ('eval_loss', 'eval_top_1'):
    assert float(a[key]) == float(b[key])

  ckpt = tmp_path / 'ckpt'
  assert checkpointing.list_steps(ckpt) == [3]
  port = helpers.free_port()
  procs = [_digits_script('evaluate.py', f'--checkpoint={ckpt}', process=i,
                          port=port) for i in range(2)]
  alone = _digits_script('evaluate.py', f'--checkpoint={ckpt}')
  (out_0, _), (out_1, _), (out_alone, _) = map(_finish, procs + [alone])
  assert out_1 == ''  # Only process 0 prints.
  both, one = json.loads(out_0), json.loads(out_alone)
  assert both['step'] == one['step'] == 3
  # Two hosts count every example once: as the workers' own evaluation.
  assert both['num_examples'] == one['num_examples'] == 300
  assert both['loss'] == pytest.approx(float(a['eval_loss']), rel=1e-6)
  assert both['top_1_acc'] == pytest.approx(float(a['eval_top_1']), abs=1e-6)
  # One host (2 devices, other per-device batches) agrees to float rounding;
  # rounding may flip at most one near-tied prediction.
  assert one['loss'] == pytest.approx(both['loss'], rel=1e-5)
  assert abs(one['top_1_acc'] - both['top_1_acc']) <= 1 / 300 + 1e-9

  # Resumed on one host with a learning rate far below float32 resolution:
  # steps 4 and 5 run, yet leave every parameter exactly as restored.
  resumed = _digits_script(
      'train.py', f'--config.checkpoint_dir={ckpt}',
      '--config.training_steps=5',
      '--config.experiment_kwargs.config.optimizer.base_lr=1e-30',
      '--allow_config_change')
  _finish(resumed)
  assert checkpointing.list_steps(ckpt) == [3, 5]
  restored = _params(ckpt / 'latest' / '5')
  assert len(restored) == len(params)
  for i, got in enumerate(restored):  # savez names the leaves arr_<i>.
    np.testing.assert_array_equal(got, a[f'arr_{i}'])


def _train_processes(tmp_path, name, *flags):
  """scripts/train.py as process 0 and 1 of a 2-host run (2 CPU devices
  each) on digits debug, checkpointing into tmp_path/ckpt; each one's output
  goes to tmp_path/<name>_<i>.log."""
  port = helpers.free_port()
  env = helpers.multiprocess_environ(
      PYTHONPATH=helpers.ROOT, JAX_PLATFORMS='cpu',
      XLA_FLAGS='--xla_force_host_platform_device_count=2')
  return [subprocess.Popen(
      [sys.executable, os.path.join(helpers.ROOT, 'scripts', 'train.py'),
       '--config=' + os.path.join(helpers.ROOT, 'configs', 'digits.py') +
       ':debug', f'--config.checkpoint_dir={tmp_path / "ckpt"}',
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
       f'--process_id={i}', *flags],
      env=env, cwd=helpers.ROOT, stderr=subprocess.STDOUT,
      stdout=open(tmp_path / f'{name}_{i}.log', 'w'))  # pylint: disable=consider-using-with
          for i in range(2)]


def _wait(procs, tmp_path, name):
  for p in procs:
    p.wait(timeout=240)
  return [(tmp_path / f'{name}_{i}.log').read_text() for i in range(2)]


@pytest.mark.slow
def test_sigterm_on_one_host_stops_both_at_one_checkpoint(tmp_path):
  """A preempted TPU VM worker: SIGTERM reaches one process of two. The stop
  vote travels through the update, so both stop after the same step, one
  checkpoint is written (by process 0) and both exit 143; the same command
  on both then resumes from it. The signalled process takes the path of a
  one-host run's SIGTERM, so this also stands for one host."""
  procs = _train_processes(tmp_path, 'first', '--config.training_steps=100000',
                           '--config.save_checkpoint_interval=1000000')
  deadline = time.time() + 240
  while ('steps/sec' not in (tmp_path / 'first_0.log').read_text() and
         time.time() < deadline and procs[0].poll() is None):
    time.sleep(0.5)
  procs[1].send_signal(signal.SIGTERM)  # Process 0 gets no signal.
  outs = _wait(procs, tmp_path, 'first')
  assert 'steps/sec' in outs[0], outs[0][-3000:]
  for p, out in zip(procs, outs):
    assert p.returncode == 143, out[-3000:]
  steps = checkpointing.list_steps(tmp_path / 'ckpt')
  assert len(steps) == 1 and steps[0] > 0, steps  # One final checkpoint.
  saved = steps[0]

  procs = _train_processes(tmp_path, 'again',
                           f'--config.training_steps={saved + 2}',
                           '--allow_config_change')
  outs = _wait(procs, tmp_path, 'again')
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert checkpointing.list_steps(tmp_path / 'ckpt')[-1] == saved + 2
