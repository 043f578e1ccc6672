"""One writer per checkpoint directory: the run lock."""

import http
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from perceiver_jax.training import run_lock
from tests import gcs_emulator
from tests import helpers
from tests.gcs_emulator import gcs_env  # pylint: disable=unused-import
from tests.gcs_emulator import gcs_url  # pylint: disable=unused-import


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


def _race(directory: str) -> tuple[run_lock.RunLock, run_lock.RunLockError]:
  """Two RunLocks on `directory` acquiring at the same moment (threads);
  returns (winner, the loser's error), failing unless exactly one won."""
  barrier = threading.Barrier(2)
  results = [None, None]

  def acquire(i):
    lock = run_lock.RunLock(directory, command=f'run {i}')
    barrier.wait()
    try:
      lock.acquire()
      results[i] = lock
    except Exception as e:  # pylint: disable=broad-exception-caught
      results[i] = e  # Anything but RunLockError fails below.

  threads = [threading.Thread(target=acquire, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  winners = [r for r in results if isinstance(r, run_lock.RunLock)]
  losers = [r for r in results if isinstance(r, run_lock.RunLockError)]
  assert len(winners) == 1 and len(losers) == 1, results
  return winners[0], losers[0]


def _check_one_holder(winner, error, directory):
  winner_run = f'run {results_index(winner)}'
  assert winner_run in str(error), str(error)  # The loser names the winner.
  holder = json.loads(winner.path.read_text())
  assert holder['command'] == winner_run
  winner.release()
  gcs_emulator.forget_listings()
  with run_lock.RunLock(directory) as again:  # Released: free again.
    assert again.held


def results_index(lock: run_lock.RunLock) -> int:
  return int(lock._info['command'].split()[-1])  # pylint: disable=protected-access


def test_two_concurrent_gcs_acquirers_one_wins_without_preconditions(gcs_env):
  """gcp-storage-emulator ignores ifGenerationMatch=0, as the probe in
  RunLock detects: the write-then-read-back fallback decides."""
  del gcs_env
  directory = f'gs://{gcs_emulator.BUCKET}/race'
  winner, error = _race(directory)
  _check_one_holder(winner, error, directory)


def _enforce_if_generation_match(insert):
  """The emulator's upload handler, made to answer a conditional create of
  an existing object with 412 Precondition Failed, as GCS does. The
  emulator serves one request at a time, so check and write are atomic."""
  from gcp_storage_emulator import exceptions  # pylint: disable=g-import-not-at-top

  def handler(request, response, storage, *args, **kwargs):
    if (request.query.get('ifGenerationMatch') == ['0'] and
        request.query.get('uploadType') == ['multipart']):
      try:
        storage.get_file_obj(request.params['bucket_name'],
                             request.data['meta'].get('name'))
      except exceptions.NotFound:
        pass
      else:
        response.status = http.HTTPStatus.PRECONDITION_FAILED
        return None
    return insert(request, response, storage, *args, **kwargs)

  handler.__wrapped__ = insert
  return handler


@pytest.fixture
def enforcing_gcs_env(monkeypatch):
  """An in-process emulator that enforces ifGenerationMatch=0 on uploads;
  this process's gs:// pointed at it."""
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  enforcing = _enforce_if_generation_match(objects.insert)
  monkeypatch.setattr(objects, 'insert', enforcing)
  for _, methods in server.HANDLERS:  # The routes hold the handler itself.
    for method, handler in list(methods.items()):
      if handler is enforcing.__wrapped__:
        monkeypatch.setitem(methods, method, enforcing)
  port = helpers.free_port()
  emulator = server.create_server('127.0.0.1', port, in_memory=True,
                                  default_bucket=gcs_emulator.BUCKET)
  emulator.start()
  for name, value in gcs_emulator.environment(
      f'http://127.0.0.1:{port}').items():
    monkeypatch.setenv(name, value)
  gcs_emulator._forget_clients()  # pylint: disable=protected-access
  try:
    yield
  finally:
    gcs_emulator._forget_clients()  # pylint: disable=protected-access
    emulator.stop()


def test_two_concurrent_gcs_acquirers_one_wins_by_precondition(
    enforcing_gcs_env, monkeypatch):
  """Where the store enforces ifGenerationMatch=0 (GCS), the create itself
  decides: no settle pause is taken."""
  del enforcing_gcs_env
  monkeypatch.setattr(run_lock, '_REMOTE_SETTLE_S', 60.0)
  directory = f'gs://{gcs_emulator.BUCKET}/race'
  start = time.time()
  winner, error = _race(directory)
  assert time.time() - start < 30  # The fallback would sleep 60 s.
  _check_one_holder(winner, error, directory)
