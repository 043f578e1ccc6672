"""Checkpoint integrity: per-array checksums, finiteness, error kinds.

Why: orbax/tensorstore store array data without a checksum, so a flipped bit
in a data file under `<step>/state/ocdbt.process_0/d/` can load as a silently
different weight, and orbax's CheckpointManager has no notion of a bad step.
`tree_io.save_args` therefore records a CRC32 of every array's bytes in the
step's JSON metadata (`<step>/meta/`), which orbax commits together with the
arrays (one rename, or commit_success.txt last on GCS), so a committed step
always carries its checksums. `tree_io.read_step` recomputes them on the
restored host arrays.

A failure to read a step is one of three kinds, which decide what the
callers in `checkpointing` do with it:

  CorruptCheckpointError    the data is proven bad (checksum mismatch,
                            missing or undecodable files, unparsable
                            metadata) or not finite: fall back to an older
                            step; training moves the step aside.
  UnavailableCheckpointError the storage failed (an OSError other than a
                            missing file, tensorstore UNAVAILABLE /
                            DEADLINE_EXCEEDED ...), after `RETRY_DELAYS_S`
                            retries: nothing is moved, the run stops.
  CheckpointError           their base, also for refusals (fresh start over
                            damaged steps, disk full); its message is one
                            line meant for a person.

Also here: `install_orbax_loop_drain`, which `tree_io` calls on import, so
that a failed orbax read no longer leaves hundreds of 'Event loop is closed'
lines behind (see `_run_sync_draining`).
"""

import asyncio
import errno
import os
import shutil
import time
import zlib
from typing import Any, Callable, Iterable, Mapping, Optional, TypeVar

from absl import logging as absl_logging
import numpy as np

from perceiver_jax.training import logs

_LOG = logs.get_logger(__name__)
_T = TypeVar('_T')

# Seconds to wait before each retry of a transient read error.
RETRY_DELAYS_S = (1.0, 4.0, 16.0)

# Status codes of tensorstore / gRPC / GCS errors worth retrying.
_TRANSIENT_CODES = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'RESOURCE_EXHAUSTED',
                    'ABORTED', 'Connection reset', 'timed out', '503 ',
                    '429 ')
# Errors that say nothing about the data: no quarantine, no retry.
_ACCESS_ERRORS = (PermissionError,)
# OSErrors that prove a file is gone or is not what the format needs.
_MISSING_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used; the message is one line naming the files."""


class CorruptCheckpointError(CheckpointError):
  """The step's data is proven bad; `kind` names the quarantine suffix."""

  def __init__(self, message: str, kind: str = 'corrupt'):
    super().__init__(message)
    self.kind = kind


class UnavailableCheckpointError(CheckpointError):
  """The storage failed, not the data: retry later; nothing was moved."""


# Checksums.


def flat_leaves(tree: Any, prefix: str = '') -> Iterable[tuple[str, Any]]:
  """('a/b/c', leaf) for nested dicts (and lists) of arrays, sorted."""
  if isinstance(tree, Mapping):
    for key in sorted(tree, key=str):
      yield from flat_leaves(tree[key], f'{prefix}{key}/')
  elif isinstance(tree, (list, tuple)):
    for i, value in enumerate(tree):
      yield from flat_leaves(value, f'{prefix}{i}/')
  elif tree is not None:
    yield prefix[:-1], tree


def _crc32(leaf: Any) -> str:
  array = np.ascontiguousarray(np.asarray(leaf))
  return f'{zlib.crc32(array.view(np.uint8).reshape(-1)):08x}'


def checksums(tree: Any) -> dict[str, str]:
  """{leaf path: 'crc32-hex dtype[shape]'} of a host tree (see tree_io)."""
  return {path: f'{_crc32(leaf)} {np.asarray(leaf).dtype}'
                f'{list(np.shape(leaf))}'
          for path, leaf in flat_leaves(tree)}


def data_files(state_dir: Any) -> list[str]:
  """The array data files under a local step's `state/`, largest first
  (on remote storage: the `state/` directory itself)."""
  top = str(state_dir)
  if '://' in top or not os.path.isdir(top):
    return [top]
  files = [os.path.join(root, name) for root, _, names in os.walk(top)
           if os.path.basename(root) == 'd' for name in names]
  return sorted(files, key=lambda f: -os.path.getsize(f)) or [top]


def verify(tree: Any, expected: Optional[Mapping[str, str]],
           step_dir: Any) -> None:
  """Compares a restored tree with the checksums saved with it.

  Args:
    tree: the restored host tree (nested dicts of NumPy arrays).
    expected: `checksums()` of the saved tree, from the step's metadata;
      None for a step written before checksums existed (a note is logged).
    step_dir: the step directory, for messages.

  Raises:
    CorruptCheckpointError: naming the step, the first bad leaves and the
      data files that hold them.
  """
  if expected is None:
    _LOG.info('Checkpoint %s predates array checksums: loaded unverified.',
              step_dir)
    return
  got = checksums(tree)
  bad = sorted(k for k in set(expected) | set(got)
               if expected.get(k) != got.get(k))
  if bad:
    files = data_files(step_dir / 'state')
    raise CorruptCheckpointError(
        f'Checkpoint {step_dir} is corrupt: checksum mismatch in '
        f'{len(bad)} array(s) ({", ".join(bad[:3])}'
        f'{", ..." if len(bad) > 3 else ""}); their data is in '
        f'{", ".join(files[:3])}{" ..." if len(files) > 3 else ""}.')


def nonfinite_leaves(tree: Any) -> list[str]:
  """Paths of the floating-point leaves of `tree` holding a NaN or inf."""
  return [path for path, leaf in flat_leaves(tree)
          if np.issubdtype(np.asarray(leaf).dtype, np.inexact) and
          not np.all(np.isfinite(leaf))]


def check_finite(experiment_module: Mapping[str, Any], step_dir: Any) -> None:
  """Raises CorruptCheckpointError(kind='nonfinite') for NaN/inf arrays."""
  bad = nonfinite_leaves(experiment_module)
  if bad:
    raise CorruptCheckpointError(
        f'Checkpoint {step_dir} holds non-finite values in {len(bad)} '
        f'array(s) ({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""}): '
        'it was saved after training diverged.', kind='nonfinite')


# Error kinds.


def _chain(e: BaseException) -> Iterable[BaseException]:
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def one_line(e: BaseException, limit: int = 400) -> str:
  """'Type: first line of the message' of the root cause, shortened."""
  root = list(_chain(e))[-1]
  text = (str(root).strip().splitlines() or [''])[0]
  if len(text) > limit:
    text = text[:limit] + '...'
  return f'{type(root).__name__}: {text}'


def is_transient(e: BaseException) -> bool:
  """Whether a read error may go away by itself (network storage)."""
  for cause in _chain(e):
    if isinstance(cause, (CorruptCheckpointError,) + _MISSING_ERRORS +
                  _ACCESS_ERRORS):
      return False
    if isinstance(cause, (OSError, TimeoutError, ConnectionError)):
      return True
    text = str(cause)
    if 'NOT_FOUND' in text or 'DATA_LOSS' in text:
      return False
    if any(code in text for code in _TRANSIENT_CODES):
      return True
  return False


def is_access_error(e: BaseException) -> bool:
  return any(isinstance(c, _ACCESS_ERRORS) or 'PERMISSION_DENIED' in str(c)
             for c in _chain(e))


def is_disk_full(e: BaseException) -> bool:
  return any((isinstance(c, OSError) and c.errno == errno.ENOSPC) or
             'No space left' in str(c) for c in _chain(e))


def with_retries(read: Callable[[], _T], what: Any) -> _T:
  """Calls `read`, retrying transient errors after RETRY_DELAYS_S.

  Raises:
    UnavailableCheckpointError: if every try failed transiently, or with a
      permission error.
    Exception: any other error of `read`, unchanged.
  """
  for attempt, delay in enumerate(tuple(RETRY_DELAYS_S) + (None,)):
    try:
      return read()
    except Exception as e:  # pylint: disable=broad-exception-caught
      if is_access_error(e):
        raise UnavailableCheckpointError(
            f'Checkpoint {what} cannot be read: {one_line(e)}.') from e
      if not is_transient(e):
        raise
      if delay is None:
        raise UnavailableCheckpointError(
            f'Checkpoint {what} could not be read after {attempt + 1} tries '
            f'(storage unavailable?): {one_line(e)}. Nothing was moved or '
            'deleted; run again when the storage is back.') from e
      _LOG.warning('Reading checkpoint %s failed (%s); retrying in %.0f s.',
                   what, one_line(e), delay)
      absl_logging.debug('Transient read error', exc_info=True)
      time.sleep(delay)
  raise AssertionError('unreachable')


# Series-level reading and writing.

_QUARANTINED = ('.corrupt-', '.nonfinite-')


def quarantined(series_dir: Any) -> list[str]:
  """Steps of a series moved aside as damaged (see checkpointing)."""
  if not series_dir.is_dir():
    return []
  return sorted(str(p) for p in series_dir.iterdir()
                if any(q in p.name for q in _QUARANTINED))


def quarantine_note(series_dir: Any) -> str:
  moved = quarantined(series_dir)
  return f' Steps moved aside as damaged: {", ".join(moved)}.' if moved else ''


def check_fresh_start(series_dir: Any, allowed: bool) -> None:
  """Refuses a start from step 0 beside steps moved aside as damaged.

  Raises:
    CheckpointError: listing them, unless `allowed` (then a warning).
  """
  note = quarantine_note(series_dir)
  if not note:
    return
  if not allowed:
    raise CheckpointError(
        f'Refusing to train from scratch in {series_dir.parent}: its '
        f'checkpoints are damaged.{note} Restore them, use another '
        'checkpoint_dir, or pass --allow_fresh_start.')
  _LOG.warning('Training from scratch beside damaged checkpoints (allowed).%s',
               note)


def read_first_good(step_dirs: list[Any], read: Callable[[Any], dict],
                    on_bad: Callable[[Any, CorruptCheckpointError], None] = (
                        lambda *_: None)) -> dict[str, Any]:
  """The first of `step_dirs` that `read` reads intact and finite.

  Args:
    step_dirs: step directories, the preferred first.
    read: step directory -> tree_io.read_step of its series' manager.
    on_bad: called with each damaged step (e.g. to move it aside).

  Returns:
    What `read` returned for the first good step.

  Raises:
    UnavailableCheckpointError: at once (storage, not data).
    CheckpointError: every step given is damaged; names them.
  """
  errors = []
  for step_dir in step_dirs:
    try:
      result = read(step_dir)
      check_finite(result['experiment_module'], step_dir)
      return result
    except CorruptCheckpointError as e:
      if not step_dir.exists():  # Pruned by a concurrent writer.
        continue
      _LOG.warning('%s Trying an older step.', e)
      errors.append(str(e))
      on_bad(step_dir, e)
  raise CheckpointError(
      f'No checkpoint in {step_dirs[0].parent} could be read: ' +
      ' | '.join(errors))


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def _size(nbytes: int) -> str:
  for unit, scale in (('GiB', 2**30), ('MiB', 2**20)):
    if nbytes >= scale:
      return f'{nbytes / scale:.1f} {unit}'
  return f'{nbytes / 1024:.1f} KiB'


def disk_full_message(step_dir: Any, array_bytes: int,
                      error: Exception) -> str:
  """'Disk full' and the space one save needs: its arrays' bytes or the
  newest complete step's directory, whichever is larger."""
  series = str(step_dir.parent)
  need, free = array_bytes, ''
  if '://' not in series and os.path.isdir(series):
    steps = sorted(int(n) for n in os.listdir(series) if n.isdigit() and
                   os.path.exists(os.path.join(series, n,
                                               'commit_success.txt')))
    if steps:
      need = max(need, _dir_bytes(os.path.join(series, str(steps[-1]))))
    free = f', {_size(shutil.disk_usage(series).free)} free now'
  return (f'Disk full while saving checkpoint {step_dir} '
          f'({one_line(error)}): one checkpoint needs about '
          f'{_size(need)} ({need:,} bytes){free}. Free space under '
          f'{series}, or lower max_checkpoints_to_keep.')


# orbax's event loops.


def _run_sync_draining(coro):
  """orbax's `_run_sync_via_new_loop`, letting sibling reads finish first.

  orbax runs each synchronous save or restore in a fresh event loop and
  closes it when the call returns. When one of many concurrent array reads
  fails, the call raises at once while the other reads are still in flight
  in tensorstore's threads; each then reports to the closed loop ('Event
  loop is closed', 'exception was never retrieved': 90 to 300 lines that
  bury the real error). Here the loop first waits for its remaining tasks
  (their errors are dropped: the first one is raised), then closes.
  """
  loop = asyncio.new_event_loop()
  try:
    asyncio.set_event_loop(loop)
    return loop.run_until_complete(coro)
  finally:
    try:
      pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
      if pending:
        loop.run_until_complete(
            asyncio.gather(*pending, return_exceptions=True))
    finally:
      asyncio.set_event_loop(None)
      loop.close()


def install_orbax_loop_drain() -> None:
  """Puts `_run_sync_draining` in place of orbax's loop runner, if the
  installed orbax has it (0.11-0.12); otherwise leaves orbax as it is."""
  # pylint: disable=g-import-not-at-top,protected-access
  try:
    from orbax.checkpoint._src import asyncio_utils
  except ImportError:
    return
  if hasattr(asyncio_utils, '_run_sync_via_new_loop'):
    asyncio_utils._run_sync_via_new_loop = _run_sync_draining
