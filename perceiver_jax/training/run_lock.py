"""One writer per checkpoint directory: a lock file held for a whole run.

Two training runs on one `checkpoint_dir` would delete each other's
in-flight saves and interleave their steps in one series. `RunLock` makes
the second refuse, naming the first. The lock is `<checkpoint_dir>/
run.lock`, JSON with host, pid, start time and command line.

What it guarantees:
  * Local and NFS-like disks: the file is created with O_CREAT | O_EXCL,
    atomic on one machine (and on NFSv3+), so of two runs exactly one holds
    the lock.
  * gs://: the lock is created through gcsfs with GCS's `ifGenerationMatch=0`
    precondition (`pipe(..., mode='create')`), so the store itself lets
    exactly one of two concurrent creates succeed; the loser gets HTTP 412
    (FileExistsError) and refuses. Whether the store honours the
    precondition is checked on every acquire: a second conditional create of
    the object just written must fail. A store that ignores preconditions
    (gcp-storage-emulator 2026.7, which the tests use, accepts both creates
    on every upload path: gcsfs's pipe(mode='create') and open('xb'), and
    google-cloud-storage's upload_from_string(if_generation_match=0)) falls
    back to the next rule.
  * Other remote stores, and gs:// without gcsfs: no exclusive create
    through epath/tf.io.gfile, so the lock is written and read back after a
    pause; a run whose token is not the one read back refuses. Two runs
    starting within that pause of each other can, rarely, both pass; a run
    started later always sees the lock.
  * A lock left by a dead process on this host (pid gone) is taken over with
    a warning. A lock from another host is never taken over: delete the
    file once you know that run is gone.

Only process 0 of a multi-host run takes it (scripts/train.py).
"""

import json
import os
import socket
import sys
import time
from typing import Any, Optional
import uuid

from etils import epath

from perceiver_jax.training import checkpoint_integrity as integrity
from perceiver_jax.training import logs
from perceiver_jax.training import tree_io

_LOG = logs.get_logger(__name__)

LOCK_FILE = 'run.lock'
_REMOTE_SETTLE_S = 2.0


def _gcs_filesystem() -> Any:
  """gcsfs's filesystem (the one epath uses without TensorFlow), or None."""
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
    return fsspec.filesystem('gs')
  except (ImportError, ValueError):  # No gcsfs.
    return None


class RunLockError(integrity.CheckpointError):
  """Another run holds the checkpoint directory."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Someone else's process.
  return True


def describe(holder: dict[str, Any]) -> str:
  started = time.strftime('%Y-%m-%d %H:%M:%S',
                          time.localtime(holder.get('start_time', 0)))
  return (f'host {holder.get("host")} pid {holder.get("pid")} since '
          f'{started} ({holder.get("command", "?")})')


class RunLock:
  """The lock on one checkpoint directory; `acquire`, then `release`."""

  def __init__(self, directory: tree_io.PathLike,
               command: Optional[str] = None):
    self._dir = tree_io.as_path(directory)
    self.path = self._dir / LOCK_FILE
    self._info = {
        'host': socket.gethostname(), 'pid': os.getpid(),
        'start_time': time.time(), 'token': uuid.uuid4().hex,
        'command': command if command is not None else ' '.join(sys.argv)}
    self.held = False

  def _read(self) -> Optional[dict[str, Any]]:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):
      return {}  # Being written, or garbage: someone holds it.

  def _create_local(self) -> bool:
    try:
      fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                   0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      json.dump(self._info, f)
    return True

  def _create_conditionally(self, fs: Any, data: str) -> Optional[bool]:
    """Creates the lock on gs:// with `ifGenerationMatch=0`.

    Returns:
      True if this run holds the lock (the store enforced the precondition),
      False if the lock existed, None if the store ignored the precondition:
      our object is written (perhaps over a concurrent run's) and the caller
      must read it back.
    """
    path = os.fspath(self.path)
    try:
      fs.pipe(path, data.encode(), mode='create')
    except FileExistsError:  # HTTP 412: someone else's object is there.
      return False
    try:  # Probe: an enforcing store refuses a create over our own object.
      fs.pipe(path, data.encode(), mode='create')
    except FileExistsError:
      return True
    _LOG.debug('%s ignored ifGenerationMatch=0: verifying the lock by '
               'reading it back.', path)
    return None

  def _create_remote(self) -> bool:
    data = json.dumps(self._info)
    fs = (_gcs_filesystem() if os.fspath(self.path).startswith('gs://')
          else None)
    if self.path.exists():  # Also where preconditions are ignored.
      return False
    if fs is not None:
      created = self._create_conditionally(fs, data)
      if created is not None:
        return created
    else:
      self.path.write_text(data)
    time.sleep(_REMOTE_SETTLE_S)  # Let a concurrent writer's file land.
    holder = self._read() or {}
    return holder.get('token') == self._info['token']

  def acquire(self) -> None:
    """Takes the lock.

    Raises:
      RunLockError: naming the run that holds it.
    """
    self._dir.mkdir(parents=True, exist_ok=True)
    remote = '://' in os.fspath(self._dir)
    create = self._create_remote if remote else self._create_local
    for _ in range(3):
      if create():
        self.held = True
        return
      holder = self._read()
      if holder is None:
        continue  # Released meanwhile.
      if (not remote and holder.get('host') == self._info['host'] and
          isinstance(holder.get('pid'), int) and
          not _pid_alive(holder['pid'])):
        _LOG.warning('Taking over the lock %s of a run that is gone: %s.',
                     self.path, describe(holder))
        stale = self._dir / f'{LOCK_FILE}.stale-{self._info["token"]}'
        try:
          self.path.rename(stale)  # Of two takers, one wins the rename.
          stale.unlink()
        except FileNotFoundError:
          pass
        continue
      raise RunLockError(
          f'{self._dir} is in use by another training run: '
          f'{describe(holder)}. Wait for it to finish or use another '
          f'checkpoint_dir; if that run is dead, delete {self.path}.')
    raise RunLockError(f'Could not take the lock {self.path}.')

  def release(self) -> None:
    """Deletes the lock file if it is still ours; idempotent."""
    if not self.held:
      return
    self.held = False
    holder = self._read() or {}
    if holder.get('token') == self._info['token']:
      self.path.unlink(missing_ok=True)

  def __enter__(self) -> 'RunLock':
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
