"""One writer per checkpoint directory: the run lock."""

import json
import os
import socket
import subprocess
import sys

import pytest

from perceiver_jax.training import run_lock
from tests import helpers


def test_a_second_lock_refuses_naming_the_holder(tmp_path):
  first = run_lock.RunLock(tmp_path / 'ckpt', command='train.py A')
  first.acquire()
  holder = json.loads((tmp_path / 'ckpt' / 'run.lock').read_text())
  assert holder['pid'] == os.getpid()
  assert holder['host'] == socket.gethostname()
  with pytest.raises(run_lock.RunLockError,
                     match=rf'in use by another training run: host '
                     rf'{socket.gethostname()} pid {os.getpid()} .*train.py A'):
    run_lock.RunLock(tmp_path / 'ckpt').acquire()
  first.release()
  assert not (tmp_path / 'ckpt' / 'run.lock').exists()
  with run_lock.RunLock(tmp_path / 'ckpt') as second:  # Free again.
    assert second.held
  assert not (tmp_path / 'ckpt' / 'run.lock').exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
  dead = subprocess.Popen(['true'])
  dead.wait()  # Its pid is now free (and not reused this quickly).
  (tmp_path / 'run.lock').write_text(json.dumps(
      {'host': socket.gethostname(), 'pid': dead.pid, 'start_time': 0,
       'token': 'old', 'command': 'killed run'}))
  lock = run_lock.RunLock(tmp_path)
  lock.acquire()
  assert 'Taking over the lock' in caplog.text and 'killed run' in caplog.text
  assert json.loads((tmp_path / 'run.lock').read_text())['pid'] == os.getpid()
  lock.release()
  # Another host's lock is never taken over: its pid means nothing here.
  (tmp_path / 'run.lock').write_text(json.dumps(
      {'host': 'elsewhere', 'pid': dead.pid, 'command': 'remote run'}))
  with pytest.raises(run_lock.RunLockError, match='host elsewhere'):
    run_lock.RunLock(tmp_path).acquire()


_HOLDER = """
import sys
from perceiver_jax.training import run_lock
lock = run_lock.RunLock(sys.argv[1], command='first run')
lock.acquire()
print('locked', flush=True)
sys.stdin.readline()  # Runs until the test says it is done.
lock.release()
"""


@pytest.mark.slow  # Starts scripts/train.py (TensorFlow, JAX): ~10-25 s.
def test_train_py_refuses_a_directory_another_run_holds(tmp_path):
  """Two processes: the first holds the directory; scripts/train.py on it
  exits 1 naming the first, which then finishes normally."""
  ckpt = tmp_path / 'ckpt'
  env = dict(os.environ, PYTHONPATH=helpers.ROOT, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # One CPU device: 8 fake ones compile slowly.
  first = subprocess.Popen([sys.executable, '-c', _HOLDER, str(ckpt)],
                           env=env, cwd=helpers.ROOT, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
  try:
    assert first.stdout.readline().strip() == 'locked'
    second = subprocess.run(
        [sys.executable, 'scripts/train.py', '--config=configs/digits.py:debug',
         f'--config.checkpoint_dir={ckpt}'], env=env, cwd=helpers.ROOT,
        capture_output=True, text=True, timeout=300)
    out = second.stdout + second.stderr
    assert second.returncode == 1, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert f'pid {first.pid}' in last and 'first run' in last, out[-3000:]
    assert not os.path.exists(ckpt / 'latest')  # It wrote nothing.
    first.stdin.write('\n')
    first.stdin.flush()
    assert first.wait(timeout=60) == 0
  finally:
    if first.poll() is None:
      first.kill()
  assert not os.path.exists(ckpt / 'run.lock')
