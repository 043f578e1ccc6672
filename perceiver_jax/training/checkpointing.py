"""Disk checkpoints for jaxline training, written with orbax.

Layout under `config.checkpoint_dir` (a local path or gs://...)::

  <checkpoint_dir>/latest/<step>/  the newest `max_checkpoints_to_keep` saves
  <checkpoint_dir>/best/<step>/    the best `best_checkpoints_to_keep` (default
                                   1) by `config.best_model_eval_metric`
  <step>/state/                    orbax PyTree: experiment_module (the
                                   experiment's snapshot), train_step_rng
  <step>/meta/                     JSON: global_step, best metric, bookkeeping
  <step>/commit_success.txt        written by orbax when the step is complete

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp-<time>` and
renames it once complete (on GCS, which cannot rename, it writes
commit_success.txt last instead). A step counts only if its name is all digits
and it holds commit_success.txt, so a crash or SIGTERM mid-write leaves the
previous steps usable; the next writer of that series deletes the leftovers.

Contract with the experiment (kept small on purpose):
  * `snapshot_state()` returns {name: pytree of arrays}, as jaxline's default
    does (values from the first local device). Any JAX pytree works: dicts,
    tuples, optax NamedTuples, None.
  * `restore_from_snapshot(snapshot)` receives {name: nested dicts of NumPy
    arrays}. Every container of the saved tree comes back as a dict keyed by
    its dict key, sequence index ('0', '1', ...) or NamedTuple field; empty
    containers inside are dropped; a top-level None stays None. Haiku params
    therefore come back unchanged; rebuild anything else (optax state) with
    `restore_structure(template, value)`, e.g. with template
    `optimizer.init(params)`. Restoring needs no live template, so it works
    before lazily initialised parameters exist.

Multi-host: only process 0 writes unless `config.train_checkpoint_all_hosts`
(`best_checkpoint_all_hosts` in eval modes), in which case every process
calls save at the same step and orbax coordinates them (process 0 writes the
data, which is replicated in data-parallel training, so the directory must be
shared, e.g. gs://). Every process restores, reading the same directory.

Preemption: `install_signal_handlers()` makes SIGTERM/SIGINT set a flag read
by `stop_requested()`; the experiment stops stepping when it is set and
jaxline's `train()` then saves the final checkpoint. A second signal acts as
it would without the handlers (kills the process).
"""

import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Optional

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from perceiver_jax.training import jaxline_compat

LATEST = 'latest'
BEST = 'best'
SERIES = (LATEST, BEST)

_STATE = 'state'
_META = 'meta'
_COMMIT_FILE = 'commit_success.txt'
_TMP_MARKER = '.orbax-checkpoint-tmp'
_FORMAT_VERSION = 1
_MISSING = object()

PathLike = epath.PathLike


# Pytree <-> nested dicts of NumPy arrays.


def _key_name(entry: Any) -> str:
  """The dict key under which one pytree path entry is stored."""
  if isinstance(entry, jax.tree_util.DictKey):
    return str(entry.key)
  if isinstance(entry, jax.tree_util.SequenceKey):
    return str(entry.idx)
  if isinstance(entry, jax.tree_util.GetAttrKey):
    return entry.name
  if isinstance(entry, jax.tree_util.FlattenedIndexKey):
    return str(entry.key)
  return str(entry)


def _is_key_array(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key)


def _to_host(x: Any) -> np.ndarray:
  """Copies a leaf to host memory (typed PRNG keys as their uint32 data)."""
  if _is_key_array(x):
    x = jax.random.key_data(x)
  return np.asarray(jax.device_get(x))


def to_nested_dict(tree: Any) -> dict[str, Any]:
  """The leaves of `tree` as host NumPy arrays in nested dicts.

  Each container on a leaf's path becomes a dict level keyed by the dict key,
  the sequence index as a string, or the NamedTuple field name (the names of
  `jax.tree_util` key paths). Containers without leaves (None, empty tuples,
  optax.EmptyState) disappear. Idempotent: nested dicts map to themselves.

  Args:
    tree: any JAX pytree whose leaves are arrays or scalars.

  Returns:
    Nested dicts of NumPy arrays.

  Raises:
    ValueError: if `tree` is a bare leaf or two paths map to the same keys
      (e.g. dict keys 0 and '0').
  """
  nested: dict[str, Any] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [_key_name(entry) for entry in path]
    if not names:
      raise ValueError(f'Cannot checkpoint a bare leaf {type(leaf)}; put it '
                       'in a dict.')
    node = nested
    for name in names[:-1]:
      node = node.setdefault(name, {})
      if not isinstance(node, dict):
        raise ValueError(f'Checkpoint key collision at {"/".join(names)}.')
    if names[-1] in node:
      raise ValueError(f'Checkpoint key collision at {"/".join(names)}.')
    node[names[-1]] = _to_host(leaf)
  return nested


def _leaf_paths(nested: Mapping[str, Any], prefix=()) -> Iterable[tuple]:
  for name, value in nested.items():
    if isinstance(value, Mapping):
      yield from _leaf_paths(value, prefix + (name,))
    else:
      yield prefix + (name,)


def restore_structure(template: Any, value: Any) -> Any:
  """Puts restored arrays into the pytree structure of `template`.

  Args:
    template: a pytree with the wanted structure, e.g. `optimizer.init(params)`
      for an optax state; its leaves (arrays or jax.ShapeDtypeStruct) give the
      expected shapes and dtypes, their values are not used.
    value: the restored subtree: nested dicts as `restore_checkpoint` returns
      them (or any pytree with the same leaf paths, e.g. a live snapshot).

  Returns:
    A pytree with the structure of `template` and the leaves of `value`
    (NumPy arrays; typed PRNG key arrays where the template has them).

  Raises:
    ValueError: listing entries missing from `value`, entries of `value` that
      `template` does not have, or shape/dtype mismatches.
  """
  nested = {} if value is None else to_nested_dict(value)
  flat, treedef = jax.tree_util.tree_flatten_with_path(template)
  leaves, used, problems = [], set(), []
  for path, expected in flat:
    names = tuple(_key_name(entry) for entry in path)
    where = '/'.join(names)
    got = nested
    for name in names:
      got = got.get(name, _MISSING) if isinstance(got, Mapping) else _MISSING
    if got is _MISSING or isinstance(got, Mapping):
      problems.append(f'{where}: missing from the checkpoint')
      leaves.append(None)
      continue
    used.add(names)
    if _is_key_array(expected):
      got = jax.random.wrap_key_data(got, impl=jax.random.key_impl(expected))
    expected_dtype = getattr(expected, 'dtype', None)
    if expected_dtype is None:
      expected_dtype = np.asarray(expected).dtype
    if np.shape(got) != np.shape(expected) or got.dtype != expected_dtype:
      problems.append(
          f'{where}: checkpoint has {got.dtype}{list(np.shape(got))}, '
          f'expected {expected_dtype}{list(np.shape(expected))}')
    leaves.append(got)
  problems += [f'{"/".join(p)}: in the checkpoint but not in the template'
               for p in _leaf_paths(nested) if p not in used]
  if problems:
    shown = '\n  '.join(problems[:20])
    if len(problems) > 20:
      shown += f'\n  ... and {len(problems) - 20} more'
    raise ValueError('Checkpoint does not match the expected structure '
                     f'(different model or optimizer config?):\n  {shown}')
  return jax.tree_util.tree_unflatten(treedef, leaves)


# Directory scanning.


def _as_path(path: PathLike) -> epath.Path:
  """`path` as an epath.Path; a local one with ~ expanded and made absolute
  (orbax's array writer rejects relative paths)."""
  text = os.fspath(path)
  if '://' in text:  # gs:// and other remote stores.
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def _is_complete_step(path: epath.Path) -> bool:
  return (path.name.isdigit() and path.is_dir() and
          (path / _COMMIT_FILE).exists())


def _series_dir(path: epath.Path) -> epath.Path:
  """`path` if it holds steps, or its `latest/` if it is a checkpoint root."""
  latest = path / LATEST
  return latest if latest.is_dir() else path


def _complete_steps(series_dir: epath.Path) -> list[int]:
  """Ascending steps with a complete checkpoint; [] if there is no dir."""
  if not series_dir.is_dir():
    return []
  return sorted(int(p.name) for p in series_dir.iterdir()
                if _is_complete_step(p))


def list_steps(checkpoint_dir: PathLike) -> list[int]:
  """Steps with a complete checkpoint, ascending.

  Args:
    checkpoint_dir: a checkpoint root (its `latest/` series is listed) or a
      series directory such as `<root>/best`.

  Returns:
    The complete steps; incomplete (interrupted) writes are not listed.

  Raises:
    FileNotFoundError: if `checkpoint_dir` does not exist.
  """
  path = _as_path(checkpoint_dir)
  if not path.exists():
    raise FileNotFoundError(f'Checkpoint directory {path} does not exist.')
  return _complete_steps(_series_dir(path))


def latest_step(checkpoint_dir: PathLike) -> Optional[int]:
  """The newest complete step in `checkpoint_dir` (see list_steps), or None."""
  steps = list_steps(checkpoint_dir)
  return steps[-1] if steps else None


# Reading and writing one step.


def _orbax_checkpointer(all_processes: bool) -> ocp.Checkpointer:
  """A synchronous orbax Checkpointer for our two items (state, meta).

  Args:
    all_processes: every process calls save/restore together and orbax syncs
      them (process 0 writes). Otherwise this process works alone: no
      barriers with processes that never make the matching call.
  """
  if all_processes:
    options = ocp.options.MultiprocessingOptions(primary_host=0)
  else:
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me,
                                                 active_processes={me})
  # Every orbax layer takes its own options (the defaults sync all processes).
  handler = ocp.CompositeCheckpointHandler(
      composite_options=ocp.CompositeOptions(multiprocessing_options=options),
      **{_STATE: ocp.StandardCheckpointHandler(
          multiprocessing_options=options),
         _META: ocp.JsonCheckpointHandler(multiprocessing_options=options)})
  return ocp.Checkpointer(handler, multiprocessing_options=options)


def _reader() -> ocp.Checkpointer:
  return _orbax_checkpointer(all_processes=False)


def _read_meta(step_dir: epath.Path, reader: ocp.Checkpointer) -> dict:
  return reader.restore(
      step_dir, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
  )[_META]


def _read_step(step_dir: epath.Path, reader: ocp.Checkpointer
               ) -> dict[str, Any]:
  """Reads one complete step; see restore_checkpoint for the result."""
  try:
    restored = reader.restore(step_dir, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(),
        _META: ocp.args.JsonRestore()}))
    state, meta = restored[_STATE], restored[_META]
    if not isinstance(meta, Mapping) or meta.get('format') != _FORMAT_VERSION:
      raise ValueError(f'unknown checkpoint metadata {meta!r}')
  except Exception as e:  # pylint: disable=broad-exception-caught
    older = [s for s in _complete_steps(step_dir.parent)
             if s < int(step_dir.name)]
    hint = (' Restore the previous step instead: '
            f'{step_dir.parent / str(older[-1])}' if older else '')
    raise RuntimeError(
        f'Checkpoint {step_dir} is unreadable or corrupt ({type(e).__name__}: '
        f'{e}).{hint}') from e
  snapshot = dict(state.get('experiment_module', {}))
  for name in meta['none_keys']:
    snapshot[name] = None
  result = dict(meta['extra'])
  result.update(
      global_step=int(meta['global_step']),
      train_step_rng=state.get('train_step_rng'),
      experiment_module=snapshot,
      path=str(step_dir))
  result['_meta'] = meta
  return result


def _wrap_rng(rng: Any, meta: Mapping[str, Any]) -> Any:
  """Typed PRNG keys were saved as their data; wraps them back."""
  impl = meta.get('train_step_rng_impl')
  if impl and rng is not None:
    return jax.random.wrap_key_data(rng, impl=impl)
  return rng


def restore_checkpoint(path: PathLike) -> dict[str, Any]:
  """Reads a checkpoint into host memory, outside jaxline.

  Args:
    path: a step directory (`<root>/latest/1000`), a series directory (its
      newest complete step is read) or a checkpoint root (its `latest/`).

  Returns:
    {'global_step': int, 'train_step_rng': NumPy array or None,
     'experiment_module': {name: nested dicts of NumPy arrays} (see the module
     docstring), 'path': the step directory read, plus what else jaxline kept
     in the state (e.g. 'best_eval_metric_value' in the best series)}.

  Raises:
    FileNotFoundError: if `path` does not exist or holds no complete step.
    ValueError: if `path` is an incomplete (interrupted) write.
    RuntimeError: if the checkpoint cannot be read (corrupt files); the
      message names the previous step to try.
  """
  path = _as_path(path)
  if not path.exists():
    raise FileNotFoundError(f'Checkpoint path {path} does not exist.')
  if (path.name.isdigit() or _TMP_MARKER in path.name or
      (path / _STATE).exists()):
    step_dir = path
    if not _is_complete_step(step_dir):
      raise ValueError(
          f'Checkpoint {step_dir} is incomplete (an interrupted write?); '
          f'complete steps in {step_dir.parent}: '
          f'{_complete_steps(step_dir.parent)}.')
  else:
    series = _series_dir(path)
    steps = _complete_steps(series)
    if not steps:
      raise FileNotFoundError(f'No complete checkpoint in {series}.')
    step_dir = series / str(steps[-1])
  reader = _reader()
  try:
    result = _read_step(step_dir, reader)
  finally:
    reader.close()  # Its asyncio machinery, not left to the collector.
  result['train_step_rng'] = _wrap_rng(result['train_step_rng'],
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
      mode: jaxline mode ('train', 'eval', ...).

    Raises:
      ValueError: for an empty checkpoint_dir or a keep count below 1.
    """
    del mode  # Train and eval checkpointers behave the same.
    directory = config.get('checkpoint_dir')
    if not directory:
      raise ValueError(f'config.checkpoint_dir is {directory!r}: set it to a '
                       'local path or gs:// URL.')
    self._root = _as_path(directory)
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
    self._reader = _reader()
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
      self._writers[ckpt_series] = _orbax_checkpointer(
          self._all_hosts[ckpt_series])
      if jax.process_index() == 0:
        self._remove_interrupted_writes(ckpt_series)
    return self._writers[ckpt_series]

  def _remove_interrupted_writes(self, ckpt_series: str) -> None:
    """Deletes what crashed writes left: tmp dirs, steps without commit."""
    series_dir = self.series_dir(ckpt_series)
    if not series_dir.is_dir():
      return
    for path in series_dir.iterdir():
      if _TMP_MARKER in path.name or (
          path.name.isdigit() and not _is_complete_step(path)):
        logging.warning('Removing interrupted checkpoint write %s.', path)
        path.rmtree(missing_ok=True)

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
    if step in known and _is_complete_step(step_dir):
      logging.info('Checkpoint %s already saved.', step_dir)
      return
    if step_dir.exists():
      logging.warning('Overwriting checkpoint %s left by an earlier run.',
                      step_dir)
    tree, meta = self._pack(state)
    writer.save(step_dir, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(tree),
        _META: ocp.args.JsonSave(meta)}), force=True)
    known.add(step)
    logging.info('Saved checkpoint %s.', step_dir)
    if jax.process_index() == 0:
      self._prune(ckpt_series)

  def _pack(self, state: ml_collections.ConfigDict
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits jaxline's state into an array tree and JSON metadata."""
    snapshot = state.experiment_module.snapshot_state()
    none_keys = sorted(k for k, v in snapshot.items() if v is None)
    tree = {'experiment_module': {
        k: to_nested_dict(v) for k, v in snapshot.items() if v is not None}}
    meta = {'format': _FORMAT_VERSION, 'global_step': int(state.global_step),
            'none_keys': none_keys, 'extra': {}}
    rng = state.get('train_step_rng')
    if rng is not None:
      typed = _is_key_array(rng)
      if typed:
        meta['train_step_rng_impl'] = str(jax.random.key_impl(rng))
      # jaxline's default: one key per local device (a leading device axis).
      key_ndim = np.ndim(rng) - (0 if typed else 1)
      meta['train_step_rng_per_device'] = bool(
          key_ndim >= 1 and np.shape(rng)[0] == jax.local_device_count())
      tree['train_step_rng'] = _to_host(rng)
    for key, value in state.items():
      if key in ('global_step', 'experiment_module', 'train_step_rng'):
        continue
      if isinstance(value, (str, bool, type(None))):
        meta['extra'][key] = value
      elif np.ndim(value) == 0:
        meta['extra'][key] = np.asarray(jax.device_get(value)).item()
      else:
        raise ValueError(
            f'Cannot checkpoint state entry {key!r}: only scalars and strings '
            f'are supported besides the experiment, got {type(value)}.')
    return tree, meta

  def _prune(self, ckpt_series: str) -> None:
    keep = self._keep[ckpt_series]
    steps = _complete_steps(self.series_dir(ckpt_series))
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
        value = _read_meta(self.series_dir(BEST) / str(step), self._reader)[
            'extra'].get('best_eval_metric_value')
        value = sign * float(value)
      except Exception:  # pylint: disable=broad-exception-caught
        value = -math.inf  # Unreadable: ranked last, removed first.
      return (-math.inf if math.isnan(value) else value, step)

    return sorted(steps, key=score, reverse=True)

  # Restoring.

  def restore_path(self, ckpt_series: str) -> Optional[str]:
    """The step directory `restore` would read first, or None."""
    steps = _complete_steps(self.series_dir(ckpt_series))
    if not steps:
      return None
    return str(self.series_dir(ckpt_series) /
               str(self._ranked(ckpt_series, steps)[0]))

  def can_be_restored(self, ckpt_series: str) -> bool:
    return self.restore_path(ckpt_series) is not None

  def restore(self, ckpt_series: str) -> None:
    """Loads the newest (best) complete step into the experiment state.

    A step that cannot be read is logged as an error and the next one is
    tried, so a damaged newest step costs progress, never a wrong model.

    Raises:
      FileNotFoundError: if the series has no complete step.
      RuntimeError: if no step of the series can be read.
    """
    series_dir = self.series_dir(ckpt_series)
    steps = _complete_steps(series_dir)
    if not steps:
      raise FileNotFoundError(f'No complete checkpoint in {series_dir}.')
    errors = []
    for step in self._ranked(ckpt_series, steps):
      step_dir = series_dir / str(step)
      try:
        restored = _read_step(step_dir, self._reader)
        break
      except RuntimeError as e:
        if not step_dir.exists():  # Pruned by a concurrent writer.
          continue
        logging.error('%s Trying an older one.', e)
        errors.append(str(e))
        if jax.process_index() == 0:
          self._quarantine(step_dir)
    else:
      raise RuntimeError(f'No checkpoint in {series_dir} could be read:\n' +
                         '\n'.join(errors))
    self._apply(ckpt_series, restored)
    self._known_steps.setdefault(ckpt_series, set()).add(
        restored['global_step'])
    logging.info('Restored checkpoint %s.', restored['path'])

  def _quarantine(self, step_dir: epath.Path) -> None:
    """Moves a damaged step aside so that it is no longer listed.

    Otherwise it would stay the newest step, outlive the good steps saved
    after it under keep-last-K, and block re-saving its step number.
    """
    target = step_dir.parent / f'{step_dir.name}.corrupt-{int(time.time())}'
    try:
      step_dir.rename(target)
      logging.error('Moved damaged checkpoint %s to %s.', step_dir, target)
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
        state.train_step_rng = _wrap_rng(rng, meta)
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


# Preemption.


class PreemptionWatcher:
  """Turns SIGTERM/SIGINT into a flag that the training loop polls.

  The first signal sets the flag and puts back the handlers that were there
  before `install`, so a second signal acts as usual (terminates).
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._signals = tuple(signals)
    self._event = threading.Event()
    self._previous: dict[int, Any] = {}
    self._handler = self._handle  # One bound method, compared by identity.

  def install(self) -> None:
    """Installs the handlers; call from the main thread.

    Raises:
      RuntimeError: if called outside the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError('Signal handlers can only be installed from the '
                         'main thread.')
    for signum in self._signals:
      previous = signal.signal(signum, self._handler)
      if previous is not self._handler:
        # None: a handler not installed from Python; default is closest.
        self._previous[signum] = (signal.SIG_DFL if previous is None
                                  else previous)

  def uninstall(self) -> None:
    """Puts back the handlers found by `install` (the flag is kept)."""
    for signum, previous in self._previous.items():
      if signal.getsignal(signum) is self._handler:
        signal.signal(signum, previous)
    self._previous.clear()

  def stop_requested(self) -> bool:
    return self._event.is_set()

  def reset(self) -> None:
    self._event.clear()

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    logging.warning('Received %s: stopping after the current step and saving '
                    'a checkpoint. Send it again to exit at once.',
                    signal.Signals(signum).name)
    self._event.set()
    self.uninstall()


_WATCHER = PreemptionWatcher()


def install_signal_handlers() -> None:
  """Installs the process-wide PreemptionWatcher (main thread only)."""
  _WATCHER.install()


def uninstall_signal_handlers() -> None:
  _WATCHER.uninstall()


def stop_requested() -> bool:
  """True once SIGTERM/SIGINT arrived after install_signal_handlers()."""
  return _WATCHER.stop_requested()


def reset_stop_request() -> None:
  _WATCHER.reset()
