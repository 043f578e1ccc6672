"""jaxline's Checkpointer on disk: which steps to write, keep and restore.

`make_checkpointer` is the `checkpointer_factory` for `jaxline.platform.main`.
Steps are written and read in the format of `tree_io`, which describes the
layout, why an interrupted write is never loaded, and what restored values
look like. Under `config.checkpoint_dir` (a local path or gs://...)::

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
calls save at the same step and orbax coordinates them (process 0 writes the
data, which is replicated in data-parallel training, so the directory must be
shared, e.g. gs://). Every process restores, reading the same directory.

Preemption (`preemption.stop_requested()`) ends training through the
experiment; jaxline's `train()` then saves the final checkpoint here.

Damaged steps (checksums, undecodable files, NaN/inf arrays) are skipped for
older ones, moved aside and never silently replaced by a fresh start;
transient storage errors are retried (see `checkpoint_integrity`). Resuming
with a trajectory-changing config is refused (see `config_record`).
"""

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
    step_dirs = [path]
  else:  # Newest first, falling back to older steps.
    series = _series_dir(path)
    step_dirs = [series / str(s) for s in
                 reversed(tree_io.complete_steps(series))]
    if not step_dirs:
      raise FileNotFoundError(f'No complete checkpoint in {series}.' +
                              integrity.quarantine_note(series))
  reader = tree_io.orbax_checkpointer(all_processes=False)
  try:
    if len(step_dirs) == 1:  # Asked for by name: no fallback.
      result = tree_io.read_step(step_dirs[0], reader)
      integrity.check_finite(result['experiment_module'], step_dirs[0])
    else:
      result = integrity.read_first_good(
          step_dirs, lambda d: tree_io.read_step(d, reader))
  finally:
    reader.close()  # Its asyncio machinery, not left to the collector.
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
  best `best_eval_metric_value`. Saves are synchronous: when `save` returns,
  the step is complete on disk. Every call lists the directory afresh, so an
  eval-mode checkpointer sees steps written by a concurrent training job.
  """

  def __init__(self, config: ml_collections.ConfigDict, mode: str):
    """Creates the checkpointer.

    Args:
      config: jaxline config; uses checkpoint_dir, max_checkpoints_to_keep,
        best_checkpoints_to_keep (optional), best_model_eval_metric_higher_is_
        better, train_checkpoint_all_hosts and best_checkpoint_all_hosts.
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
    self._writers: dict[str, ocp.Checkpointer] = {}
    self._reader = tree_io.orbax_checkpointer(all_processes=False)
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

  def _writer(self, ckpt_series: str) -> ocp.Checkpointer:
    if ckpt_series not in self._writers:
      self._writers[ckpt_series] = tree_io.orbax_checkpointer(
          self._all_hosts[ckpt_series])
      if jax.process_index() == 0:
        tree_io.remove_interrupted_writes(self.series_dir(ckpt_series))
    return self._writers[ckpt_series]

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
    writer = self._writer(ckpt_series)
    if step in known and tree_io.is_complete_step(step_dir):
      logging.info('Checkpoint %s already saved.', step_dir)
      return
    if step_dir.exists():
      logging.warning('Overwriting checkpoint %s left by an earlier run.',
                      step_dir)
    primary = jax.process_index() == 0
    if primary and ckpt_series == LATEST:
      self._prune(ckpt_series, room_for=step)  # A full disk fits keep steps.
    self._record_config()
    try:
      tree_io.write_step(step_dir, state, writer, {'config': self._config})
    except Exception as e:
      if integrity.is_disk_full(e):
        raise integrity.CheckpointError(integrity.disk_full_message(
            step_dir, tree_io.array_bytes(state), e)) from e
      raise
    known.add(step)
    logging.info('Saved checkpoint %s.', step_dir)
    if primary:
      self._prune(ckpt_series)

  def _record_config(self) -> None:
    if self._train and not self._config_written and (
        jax.process_index() == 0):
      config_record.write_config_file(self._root, self._config)
      self._config_written = True

  def _prune(self, ckpt_series: str, room_for: Optional[int] = None) -> None:
    """Keeps the best `keep` steps, or `keep - 1` (at least 1) besides
    step `room_for`, about to be written: so a disk sized for `keep` steps
    can take the next one."""
    keep = self._keep[ckpt_series]
    steps = [s for s in tree_io.complete_steps(self.series_dir(ckpt_series))
             if s != room_for]
    if keep is not None and room_for is not None:
      keep = max(keep - 1, 1)  # Never none while the new one is written.
    if keep is None or len(steps) <= keep:
      return
    ranked = self._ranked(ckpt_series, steps)
    for step in ranked[keep:]:
      path = self.series_dir(ckpt_series) / str(step)
      logging.info('Deleting old checkpoint %s.', path)
      path.rmtree(missing_ok=True)

  def _ranked(self, ckpt_series: str, steps: list[int]) -> list[int]:
    """Complete steps, the one to restore first."""
    if ckpt_series == LATEST:
      return sorted(steps, reverse=True)
    sign = 1.0 if self._higher_is_better else -1.0

    def score(step: int) -> tuple[float, int]:
      try:
        meta = tree_io.read_meta(self.series_dir(BEST) / str(step),
                                 self._reader)
        value = sign * float(meta['extra'].get('best_eval_metric_value'))
      except Exception:  # pylint: disable=broad-exception-caught
        value = -math.inf  # Unreadable: ranked last, removed first.
      return (-math.inf if math.isnan(value) else value, step)

    return sorted(steps, key=score, reverse=True)

  # Restoring.

  def restore_path(self, ckpt_series: str) -> Optional[str]:
    """The step directory `restore` would read first, or None."""
    steps = tree_io.complete_steps(self.series_dir(ckpt_series))
    if not steps:
      return None
    return str(self.series_dir(ckpt_series) /
               str(self._ranked(ckpt_series, steps)[0]))

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
    wrong model.

    Raises:
      FileNotFoundError: if the series has no complete step.
      integrity.CheckpointError: if no step of the series can be read.
      integrity.UnavailableCheckpointError: if the storage kept failing.
      config_record.ConfigChangeError: (train) for a trajectory change.
    """
    series_dir = self.series_dir(ckpt_series)
    steps = tree_io.complete_steps(series_dir)
    if not steps:
      raise FileNotFoundError(f'No complete checkpoint in {series_dir}.')

    def on_bad(step_dir, error):
      if jax.process_index() == 0:
        self._quarantine(step_dir, error.kind)

    restored = integrity.read_first_good(
        [series_dir / str(s) for s in self._ranked(ckpt_series, steps)],
        lambda d: tree_io.read_step(d, self._reader), on_bad)
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
    """Saves are synchronous: nothing is ever pending."""

  def close(self) -> None:
    for writer in self._writers.values():
      writer.close()
    self._writers.clear()
    self._reader.close()


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

