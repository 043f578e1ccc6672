"""jaxline's Checkpointer on disk: which steps to write, keep and restore.

`make_checkpointer` is the `checkpointer_factory` for `jaxline.platform.main`.
Each series is one orbax CheckpointManager (`tree_io.series_manager`): it
writes steps atomically, deletes interrupted writes, and keeps the newest
(latest) or best (best) steps. Steps are in the format of `tree_io`, which
describes the layout, why an interrupted write is never loaded, and what
restored values look like. Under `config.checkpoint_dir` (a local path or
gs://...)::

  <checkpoint_dir>/latest/<step>/  the newest `max_checkpoints_to_keep` saves
  <checkpoint_dir>/best/<step>/    the best `best_checkpoints_to_keep` (default
                                   1) by `config.best_model_eval_metric`

Contract with the experiment (kept small on purpose):
  * `snapshot_state()` returns {name: pytree of arrays}, as jaxline's default
    does (values from the first local device). Any JAX pytree works: dicts,
    tuples, optax NamedTuples, None.
  * `restore_from_snapshot(snapshot)` receives {name: nested dicts of NumPy
    arrays} (see `tree_io`): Haiku params come back unchanged; rebuild
    anything else (optax state) with `tree_io.restore_structure`.

Multi-host: only process 0 writes unless `config.train_checkpoint_all_hosts`
(`best_checkpoint_all_hosts` in eval modes), in which case every process
calls save at the same step and the manager coordinates them (process 0
writes the data, which is replicated in data-parallel training, so the
directory must be shared, e.g. gs://). Every process restores, reading the
same directory; process-local managers read without barriers.

Saves are synchronous unless `config.checkpoint_async` (default False): then
the manager writes in a background thread, and `save`, any listing or
restore, `wait_for_checkpointing_to_finish` and `close` wait for it first. A
save cut short (SIGTERM, SIGKILL) is an unrenamed tmp directory, never a
listed step, in either mode. Preemption (`preemption.stop_requested()`) ends
training through the experiment; jaxline's `train()` then saves the final
checkpoint here and waits for it.

Damaged steps (checksums, undecodable files, NaN/inf arrays) are skipped for
older ones, moved aside and never silently replaced by a fresh start;
transient storage errors are retried (see `checkpoint_integrity`). Resuming
with a trajectory-changing config is refused (see `config_record`).
"""

import atexit
import math
import time
from typing import Any, Callable, Optional

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from perceiver_jax.training import checkpoint_integrity as integrity
from perceiver_jax.training import config_record
from perceiver_jax.training import jaxline_compat
from perceiver_jax.training import logs
from perceiver_jax.training import tree_io

_LOG = logs.get_logger(__name__)

LATEST = 'latest'
BEST = 'best'
SERIES = (LATEST, BEST)


# Reading outside jaxline.


def _series_dir(path: epath.Path) -> epath.Path:
  """`path` if it holds steps, or its `latest/` if it is a checkpoint root."""
  latest = path / LATEST
  return latest if latest.is_dir() else path


def list_steps(checkpoint_dir: tree_io.PathLike) -> list[int]:
  """Steps with a complete checkpoint, ascending.

  Args:
    checkpoint_dir: a checkpoint root (its `latest/` series is listed) or a
      series directory such as `<root>/best`.

  Returns:
    The complete steps; incomplete (interrupted) writes are not listed.

  Raises:
    FileNotFoundError: if `checkpoint_dir` does not exist.
  """
  path = tree_io.as_path(checkpoint_dir)
  if not path.exists():
    raise FileNotFoundError(f'Checkpoint directory {path} does not exist.')
  return tree_io.complete_steps(_series_dir(path))


def latest_step(checkpoint_dir: tree_io.PathLike) -> Optional[int]:
  """The newest complete step in `checkpoint_dir` (see list_steps), or None."""
  steps = list_steps(checkpoint_dir)
  return steps[-1] if steps else None


def restore_checkpoint(path: tree_io.PathLike) -> dict[str, Any]:
  """Reads a checkpoint into host memory, outside jaxline.

  Args:
    path: a step directory (`<root>/latest/1000`), a series directory (its
      newest complete step is read) or a checkpoint root (its `latest/`).

  Returns:
    {'global_step': int, 'train_step_rng': NumPy array or None,
     'experiment_module': {name: nested dicts of NumPy arrays} (see
     `tree_io`), 'path': the step directory read, plus what else jaxline kept
     in the state (e.g. 'best_eval_metric_value' in the best series)}.

  Raises:
    FileNotFoundError: if `path` does not exist or holds no complete step.
    ValueError: if `path` is an incomplete (interrupted) write.
    RuntimeError: if the checkpoint cannot be read (corrupt files); the
      message names the previous step to try.
  """
  path = tree_io.as_path(path)
  if not path.exists():
    raise FileNotFoundError(f'Checkpoint path {path} does not exist.')
  if tree_io.is_step_dir(path):
    if not tree_io.is_complete_step(path):
      raise ValueError(
          f'Checkpoint {path} is incomplete (an interrupted write?); '
          f'complete steps in {path.parent}: '
          f'{tree_io.complete_steps(path.parent)}.')
    series, steps = path.parent, [int(path.name)]
  else:  # Newest first, falling back to older steps.
    series = _series_dir(path)
    steps = tree_io.complete_steps(series)[::-1]
    if not steps:
      raise FileNotFoundError(f'No complete checkpoint in {series}.' +
                              integrity.quarantine_note(series))
  manager = tree_io.series_manager(series, all_processes=False)
  try:
    if len(steps) == 1:  # Asked for by name: no fallback.
      result = tree_io.read_step(manager, steps[0])
      integrity.check_finite(result['experiment_module'], result['path'])
    else:
      result = integrity.read_first_good(
          [series / str(s) for s in steps],
          lambda d: tree_io.read_step(manager, int(d.name)))
  finally:
    manager.close()  # Its threads and asyncio machinery.
  result['train_step_rng'] = tree_io.wrap_rng(result['train_step_rng'],
                                              result.pop('_meta'))
  return result


# The jaxline checkpointer.


def _device_put_per_device(rows: np.ndarray) -> jax.Array:
  """[n, ...] rows onto the local devices as a pmap-ready array."""
  devices = jax.local_devices()
  if rows.shape[0] != len(devices):
    logging.warning(
        'train_step_rng was saved for %d devices, restoring onto %d: '
        'reusing the first saved key on every device.', rows.shape[0],
        len(devices))
    rows = np.broadcast_to(rows[:1], (len(devices),) + rows.shape[1:])
  return jaxline_compat.device_put_sharded(list(rows), devices)


class DiskCheckpointer:
  """jaxline's Checkpointer interface on disk (see the module docstring).

  Series 'latest' keeps the newest `config.max_checkpoints_to_keep` steps;
  'best' keeps `config.best_checkpoints_to_keep` (default 1) steps with the
  best `best_eval_metric_value` (NaN ranks worst). Each series has one
  CheckpointManager, made when first used; it writes (and deletes
  interrupted writes) only from the first `save` on, so an eval-mode
  checkpointer changes nothing of a concurrent training job's series. Every
  call re-reads the directory (`manager.reload()`), so it sees steps written
  by another job.
  """

  def __init__(self, config: ml_collections.ConfigDict, mode: str):
    """Creates the checkpointer.

    Args:
      config: jaxline config; uses checkpoint_dir, max_checkpoints_to_keep,
        best_checkpoints_to_keep (optional), best_model_eval_metric_higher_is_
        better, train_checkpoint_all_hosts, best_checkpoint_all_hosts and
        checkpoint_async (optional, default False: synchronous saves).
      mode: jaxline mode ('train', 'eval', ...); in 'train' the config is
        checked on resume and written to config.json, and a fresh start
        beside damaged steps is refused. Also reads checkpoint_allow_fresh_
        start and checkpoint_allow_config_change (default False).

    Raises:
      ValueError: for an empty checkpoint_dir or a keep count below 1.
    """
    self._train = mode == 'train'
    self._allow_fresh_start = bool(
        config.get('checkpoint_allow_fresh_start', False))
    self._allow_config_change = bool(
        config.get('checkpoint_allow_config_change', False))
    self._config = config_record.resolved(config)
    self._config_written = False
    self._started = False
    directory = config.get('checkpoint_dir')
    if not directory:
      raise ValueError(f'config.checkpoint_dir is {directory!r}: set it to a '
                       'local path or gs:// URL.')
    self._root = tree_io.as_path(directory)
    self._keep = {
        LATEST: config.max_checkpoints_to_keep,
        BEST: config.get('best_checkpoints_to_keep', 1),
    }
    for series, keep in self._keep.items():
      if keep is not None and keep < 1:
        raise ValueError(f'Keep at least 1 {series!r} checkpoint; got {keep}.')
    self._higher_is_better = config.get(
        'best_model_eval_metric_higher_is_better', True)
    self._best_metric = config.get('best_model_eval_metric', '')
    self._all_hosts = {
        LATEST: bool(config.get('train_checkpoint_all_hosts', False)),
        BEST: bool(config.get('best_checkpoint_all_hosts', False)),
    }
    self._states: dict[str, ml_collections.ConfigDict] = {}
    self._async = bool(config.get('checkpoint_async', False))
    if self._async:  # A pending save finishes before the process exits.
      atexit.register(self.wait_for_checkpointing_to_finish)
    # Per series: its manager, and whether it was made for writing.
    self._managers: dict[str, tuple[ocp.CheckpointManager, bool]] = {}
    # Steps this object wrote or read; re-saving one of them is a no-op.
    self._known_steps: dict[str, set[int]] = {}

  @property
  def directory(self) -> epath.Path:
    return self._root

  def series_dir(self, ckpt_series: str) -> epath.Path:
    """The directory holding the steps of `ckpt_series`."""
    if ckpt_series not in SERIES:
      raise ValueError(
          f'Unknown checkpoint series {ckpt_series!r}; expected one of '
          f'{SERIES}.')
    return self._root / ckpt_series

  def get_experiment_state(self, ckpt_series: str) -> ml_collections.ConfigDict:
    """The mutable state jaxline fills in (global_step, experiment_module)."""
    self.series_dir(ckpt_series)  # Validates the name.
    if ckpt_series not in self._states:
      self._states[ckpt_series] = ml_collections.ConfigDict()
    return self._states[ckpt_series]

  # Saving.

  def _best_score(self, metrics: Optional[dict[str, Any]]) -> float:
    """The manager's `best_fn`: higher is better; NaN (and none) is worst."""
    value = float((metrics or {}).get('best_eval_metric_value', math.nan))
    if math.isnan(value):
      return -math.inf
    return value if self._higher_is_better else -value

  def _manager(self, ckpt_series: str,
               write: bool = False) -> ocp.CheckpointManager:
    """The series' manager, up to date with the directory."""
    manager, writes = self._managers.get(ckpt_series, (None, False))
    if manager is not None and write and not writes:
      manager.close()  # A reader; the writer deletes interrupted writes.
      manager = None
    if manager is None:
      manager = tree_io.series_manager(
          self.series_dir(ckpt_series),
          all_processes=self._all_hosts[ckpt_series], write=write,
          max_to_keep=self._keep[ckpt_series],
          best_fn=self._best_score if ckpt_series == BEST else None,
          async_save=self._async)
      self._managers[ckpt_series] = (manager, write or writes)
    else:
      self._wait(ckpt_series, manager)
      manager.reload()
    return manager

  def _wait(self, ckpt_series: str, manager: ocp.CheckpointManager) -> None:
    """Waits for a pending (async) save; a full disk as one line."""
    try:
      manager.wait_until_finished()
    except Exception as e:
      self._raise_if_disk_full(ckpt_series, e)
      raise

  def _raise_if_disk_full(self, ckpt_series: str, error: Exception) -> None:
    if integrity.is_disk_full(error):
      state = self.get_experiment_state(ckpt_series)
      raise integrity.CheckpointError(integrity.disk_full_message(
          self.series_dir(ckpt_series) / str(int(state.global_step)),
          tree_io.array_bytes(state), error)) from error

  def save(self, ckpt_series: str) -> None:
    """Writes the experiment state as a new step of `ckpt_series`."""
    state = self.get_experiment_state(ckpt_series)
    if 'global_step' not in state or 'experiment_module' not in state:
      raise ValueError(
          f'Experiment state of {ckpt_series!r} lacks global_step or '
          f'experiment_module: {sorted(state.keys())}.')
    if not self._all_hosts[ckpt_series] and jax.process_index() != 0:
      logging.log_first_n(logging.INFO, 'Process %d does not write %r '
                          'checkpoints.', 1, jax.process_index(), ckpt_series)
      return
    step = int(state.global_step)
    step_dir = self.series_dir(ckpt_series) / str(step)
    known = self._known_steps.setdefault(ckpt_series, set())
    manager = self._manager(ckpt_series, write=True)
    if step in manager.all_steps():
      if step in known:
        logging.info('Checkpoint %s already saved.', step_dir)
        return
      logging.warning('Overwriting checkpoint %s left by an earlier run.',
                      step_dir)
      manager.delete(step)
    if ckpt_series == LATEST:
      self._prune_before_save(manager, step)
    self._record_config()
    metrics = None
    if ckpt_series == BEST:
      metrics = {'best_eval_metric_value': float(
          state.get('best_eval_metric_value', math.nan))}
    try:
      manager.save(step, args=tree_io.save_args(state, {
          'config': self._config}), metrics=metrics, force=True)
    except Exception as e:
      self._raise_if_disk_full(ckpt_series, e)
      raise
    known.add(step)
    logging.info('Saved checkpoint %s%s.', step_dir,
                 ' (finishing in the background)' if self._async else '')

  def _record_config(self) -> None:
    if self._train and not self._config_written and (
        jax.process_index() == 0):
      config_record.write_config_file(self._root, self._config)
      self._config_written = True

  def _prune_before_save(self, manager: ocp.CheckpointManager,
                         step: int) -> None:
    """Deletes the oldest steps, keeping `keep - 1` (at least 1) besides
    `step`, about to be written: so a disk sized for `keep` steps can take
    the next one (the manager itself prunes only after a save)."""
    keep = self._keep[LATEST]
    steps = [s for s in manager.all_steps() if s != step]
    if keep is None or len(steps) <= max(keep - 1, 1):
      return
    for old in sorted(steps)[:len(steps) - max(keep - 1, 1)]:
      logging.info('Deleting old checkpoint %s before saving step %d.',
                   self.series_dir(LATEST) / str(old), step)
      manager.delete(old)

  def _ranked(self, ckpt_series: str,
              manager: ocp.CheckpointManager) -> list[int]:
    """Complete steps, the one to restore first: the newest, or the best
    (steps written before the manager, without its metrics, last)."""
    steps = sorted(manager.all_steps(), reverse=True)
    if ckpt_series == LATEST:
      return steps
    metrics = {s: manager.metrics(s) for s in steps}
    return sorted(steps, key=lambda s: (metrics[s] is not None,
                                        self._best_score(metrics[s])),
                  reverse=True)

  # Restoring.

  def restore_path(self, ckpt_series: str) -> Optional[str]:
    """The step directory `restore` would read first, or None."""
    ranked = self._ranked(ckpt_series, self._manager(ckpt_series))
    return str(self.series_dir(ckpt_series) / str(ranked[0])) if ranked else (
        None)

  def can_be_restored(self, ckpt_series: str) -> bool:
    """Whether `restore` has a step to read.

    Raises:
      integrity.CheckpointError: on a train run's first call, if the series
        has no step but damaged ones were moved aside (unless
        checkpoint_allow_fresh_start): starting from scratch would hide them.
    """
    found = self.restore_path(ckpt_series) is not None
    if (self._train and ckpt_series == LATEST and not self._started and
        not found):
      integrity.check_fresh_start(self.series_dir(LATEST),
                                  self._allow_fresh_start)
      self._record_config()
    self._started = self._started or self._train
    return found

  def restore(self, ckpt_series: str) -> None:
    """Loads the newest (best) complete step into the experiment state.

    A damaged step (see `checkpoint_integrity`) is logged, moved aside and
    the next one is tried, so a damaged newest step costs progress, never a
    wrong model. A pending async save is finished first.

    Raises:
      FileNotFoundError: if the series has no complete step.
      integrity.CheckpointError: if no step of the series can be read.
      integrity.UnavailableCheckpointError: if the storage kept failing.
      config_record.ConfigChangeError: (train) for a trajectory change.
    """
    series_dir = self.series_dir(ckpt_series)
    manager = self._manager(ckpt_series)
    ranked = self._ranked(ckpt_series, manager)
    if not ranked:
      raise FileNotFoundError(f'No complete checkpoint in {series_dir}.')

    def on_bad(step_dir, error):
      if jax.process_index() == 0:
        self._quarantine(step_dir, error.kind)

    try:
      restored = integrity.read_first_good(
          [series_dir / str(s) for s in ranked],
          lambda d: tree_io.read_step(manager, int(d.name)), on_bad)
    finally:
      manager.reload()  # Forgets the steps moved aside.
    if self._train and ckpt_series == LATEST:
      self._started = True
      config_record.check_resume(restored['_meta'].get('config'),
                                 self._config, restored['path'],
                                 self._allow_config_change)
      self._record_config()
    self._apply(ckpt_series, restored)
    self._known_steps.setdefault(ckpt_series, set()).add(
        restored['global_step'])
    logging.info('Restored checkpoint %s.', restored['path'])

  def _quarantine(self, step_dir: epath.Path, kind: str) -> None:
    """Moves a damaged step aside so that it is no longer listed.

    Otherwise it would stay the newest step, outlive the good steps saved
    after it under keep-last-K, and block re-saving its step number.
    """
    target = step_dir.parent / f'{step_dir.name}.{kind}-{int(time.time())}'
    try:
      step_dir.rename(target)
      _LOG.warning('Moved damaged checkpoint %s to %s.', step_dir, target)
    except OSError as e:
      logging.error('Could not move damaged checkpoint %s aside: %s', step_dir,
                    e)

  def _apply(self, ckpt_series: str, restored: dict[str, Any]) -> None:
    """Writes a restored step into the live experiment state."""
    state = self.get_experiment_state(ckpt_series)
    saved_metric = restored.get('best_model_eval_metric')
    if (ckpt_series == BEST and saved_metric and self._best_metric and
        saved_metric != self._best_metric):
      logging.warning('Best checkpoint was selected by %r, config says %r.',
                      saved_metric, self._best_metric)
    for key in list(state.keys()):
      if key == 'experiment_module':
        state.experiment_module.restore_from_snapshot(
            restored['experiment_module'])
      elif key == 'global_step':
        state.global_step = restored['global_step']
      elif key == 'train_step_rng':
        rng, meta = restored['train_step_rng'], restored['_meta']
        if rng is not None and meta.get('train_step_rng_per_device'):
          rng = _device_put_per_device(rng)
        state.train_step_rng = tree_io.wrap_rng(rng, meta)
      elif key in restored:
        state[key] = restored[key]

  def wait_for_checkpointing_to_finish(self) -> None:
    """Returns once every save has reached the disk (async saves)."""
    for series, (manager, _) in list(self._managers.items()):
      self._wait(series, manager)

  def close(self) -> None:
    """Finishes pending saves and releases the managers."""
    managers, self._managers = self._managers, {}
    for manager, _ in managers.values():
      manager.close()
    if self._async:
      atexit.unregister(self.wait_for_checkpointing_to_finish)


def make_checkpointer(config: ml_collections.ConfigDict,
                      mode: str) -> DiskCheckpointer:
  """`checkpointer_factory` for `jaxline.platform.main`."""
  return DiskCheckpointer(config, mode)


def make_checkpointer_factory(
    **overrides: Any
) -> Callable[[ml_collections.ConfigDict, str], DiskCheckpointer]:
  """A checkpointer factory with config fields overridden.

  Args:
    **overrides: config fields to replace, e.g. checkpoint_dir='gs://b/x',
      max_checkpoints_to_keep=10, best_checkpoints_to_keep=3.

  Returns:
    A function (config, mode) -> DiskCheckpointer.
  """

  def factory(config: ml_collections.ConfigDict, mode: str):
    if overrides:
      config = ml_collections.ConfigDict(config.to_dict())
      config.update(overrides)
    return DiskCheckpointer(config, mode)

  return factory

