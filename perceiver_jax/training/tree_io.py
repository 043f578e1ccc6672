"""Pytrees on disk: the step format of perceiver_jax checkpoints, via orbax.

A series directory (see `checkpointing`: `<root>/latest`, `<root>/best`, on a
local path or gs://...) holds one directory per saved step, written by an
orbax `CheckpointManager` (`series_manager`) with two items::

  <step>/state/                orbax PyTree: experiment_module (the
                               experiment's snapshot), train_step_rng
  <step>/meta/                 JSON: global_step, best metric, bookkeeping
  <step>/metrics/              JSON (best series): what the manager ranks by
  <step>/commit_success.txt    written by orbax when the step is complete

This is the layout a plain orbax Checkpointer gave steps before the manager
(`write_step` still writes it, for scripts), so those steps read unchanged.

Integrity: the metadata also holds a CRC32 of every array
(`checkpoint_integrity`), committed with the arrays and checked by
`read_step`, and the resolved config of the run (`config_record`).

Atomicity is orbax's: a step is written into
`<step>.orbax-checkpoint-tmp-<time>` and renamed once complete (on GCS, which
cannot rename, commit_success.txt is written last instead), and the manager
deletes such leftovers when it starts writing. A step counts only if its name
is all digits and it holds commit_success.txt (`STEPS`), so a crash or
SIGTERM mid-write leaves the previous steps usable.

What reading gives back: {name: nested dicts of NumPy arrays}. Every
container of the saved tree comes back as a dict keyed by its dict key,
sequence index ('0', '1', ...) or NamedTuple field; empty containers inside
are dropped; a top-level None stays None. Haiku params therefore come back
unchanged; rebuild anything else (optax state) with
`restore_structure(template, value)`, e.g. with template
`optimizer.init(params)`. Reading needs no live template, so it works before
lazily initialised parameters exist.
"""

import os
from typing import Any, Callable, Iterable, Mapping, Optional

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from perceiver_jax.training import checkpoint_integrity as integrity

_STATE = 'state'
_META = 'meta'
_COMMIT_FILE = 'commit_success.txt'
_TMP_MARKER = '.orbax-checkpoint-tmp'
_FORMAT_VERSION = 1
_MISSING = object()

PathLike = epath.PathLike

integrity.install_orbax_loop_drain()


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
    value: the restored subtree: nested dicts as `read_step` (and
      `checkpointing.restore_checkpoint`) return them, or any pytree with the
      same leaf paths, e.g. a live snapshot.

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


# Steps of a series.


def as_path(path: PathLike) -> epath.Path:
  """`path` as an epath.Path; a local one with ~ expanded and made absolute
  (orbax's array writer rejects relative paths)."""
  text = os.fspath(path)
  if '://' in text:  # gs:// and other remote stores.
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_complete_step(path: epath.Path) -> bool:
  """Whether `path` is a step directory whose write finished."""
  return (path.name.isdigit() and path.is_dir() and
          (path / _COMMIT_FILE).exists())


def is_step_dir(path: epath.Path) -> bool:
  """Whether `path` names a step directory, complete or interrupted."""
  return (path.name.isdigit() or _TMP_MARKER in path.name or
          (path / _STATE).exists())


class _CommittedSteps(ocp.path.step.NameFormat):
  """orbax's step naming for our series: `<step>`, committed ones only.

  Unlike orbax's standard format, which trusts any local `<digits>`
  directory, this one wants the commit_success.txt orbax writes into every
  step, and lists with one directory read (no bucket lookup on gs://).
  """

  def build_name(self, step: int) -> str:
    return str(step)

  def find_all(self, base_path: PathLike):
    base = epath.Path(base_path)
    if not base.is_dir():
      return iter([])
    found = [ocp.path.step.Metadata(step=int(p.name), path=p)
             for p in base.iterdir() if is_complete_step(p)]
    return iter(sorted(found, key=lambda m: m.step))

  def find_step(self, base_path: PathLike, step: int):
    path = epath.Path(base_path) / str(step)
    if not is_complete_step(path):
      raise ValueError(f'No complete checkpoint step {step} in {base_path}.')
    return ocp.path.step.Metadata(step=step, path=path)


STEPS = _CommittedSteps()


def complete_steps(series_dir: epath.Path) -> list[int]:
  """Ascending steps with a complete checkpoint; [] if there is no dir."""
  return [m.step for m in STEPS.find_all(series_dir)]


def remove_interrupted_writes(series_dir: epath.Path) -> None:
  """Deletes what crashed writes left (orbax's tmp dirs, steps without their
  commit file), for writers outside a manager (scripts/import_checkpoint.py);
  a writing `series_manager` does this itself."""
  if not series_dir.is_dir():
    return
  leftovers = [t.get() for t in ocp.path.step.all_temporary_paths(series_dir)]
  leftovers += [p for p in series_dir.iterdir()
                if p.name.isdigit() and not is_complete_step(p)]
  for path in leftovers:
    logging.warning('Removing interrupted checkpoint write %s.', path)
    path.rmtree(missing_ok=True)


def _multiprocessing(all_processes: bool) -> ocp.options.MultiprocessingOptions:
  """Every process together (process 0 writes), or this process alone: no
  barriers with processes that never make the matching call."""
  if all_processes:
    return ocp.options.MultiprocessingOptions(primary_host=0)
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=me,
                                            active_processes={me})


def series_manager(series_dir: epath.Path, *, all_processes: bool,
                   write: bool = False, max_to_keep: Optional[int] = None,
                   best_fn: Optional[Callable[[Mapping[str, Any]], float]] = (
                       None),
                   async_save: bool = False) -> ocp.CheckpointManager:
  """The orbax CheckpointManager of one series, for our two items.

  Args:
    series_dir: `<root>/latest` or `<root>/best`.
    all_processes: every process calls the manager together (see
      `_multiprocessing`); otherwise this process works alone.
    write: whether this manager will save or delete: it then creates the
      directory and deletes interrupted writes. A reader changes nothing, so
      it is safe beside a concurrent writer (an evaluator beside training).
    max_to_keep: steps kept after each save (None: all).
    best_fn: metrics -> score (higher is better), to keep the best
      `max_to_keep` steps instead of the newest.
    async_save: save in a background thread (see `checkpointing`).

  Returns:
    The manager; close it when done (it holds threads and asyncio machinery).
  """
  options = _multiprocessing(all_processes)
  if write and not all_processes:
    # orbax creates it only when all processes take part.
    series_dir.mkdir(parents=True, exist_ok=True)
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  # Every orbax layer takes its own options (the defaults sync all processes).
  state = ocp.StandardCheckpointHandler(multiprocessing_options=options)
  meta = ocp.JsonCheckpointHandler(multiprocessing_options=options)
  for item, handler, arg_types in (
      (_STATE, state, (ocp.args.StandardSave, ocp.args.StandardRestore)),
      (_META, meta, (ocp.args.JsonSave, ocp.args.JsonRestore))):
    for arg_type in arg_types:
      registry.add(item, arg_type, handler)
  return ocp.CheckpointManager(
      series_dir, handler_registry=registry,
      options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep if write else None,
          best_fn=best_fn, best_mode='max',
          step_name_format=STEPS, create=write and all_processes,
          cleanup_tmp_directories=write,
          enable_async_checkpointing=async_save,
          save_root_metadata=False, multiprocessing_options=options))


def orbax_checkpointer(all_processes: bool) -> ocp.Checkpointer:
  """A synchronous orbax Checkpointer for one step outside a series manager
  (`write_step`); close it when done."""
  options = _multiprocessing(all_processes)
  handler = ocp.CompositeCheckpointHandler(
      composite_options=ocp.CompositeOptions(multiprocessing_options=options),
      **{_STATE: ocp.StandardCheckpointHandler(
          multiprocessing_options=options),
         _META: ocp.JsonCheckpointHandler(multiprocessing_options=options)})
  return ocp.Checkpointer(handler, multiprocessing_options=options)


# Reading and writing one step.


def _pack(state: ml_collections.ConfigDict
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


def save_args(state: ml_collections.ConfigDict,
              extra_meta: Optional[Mapping[str, Any]] = None
              ) -> ocp.args.Composite:
  """What `series_manager(...).save(step, args=...)` writes for `state`.

  Args:
    state: jaxline's state: global_step, experiment_module (its
      `snapshot_state()` is saved), optional train_step_rng, and scalars or
      strings (e.g. best_eval_metric_value), kept in the metadata.
    extra_meta: more JSON for the metadata (e.g. {'config': ...}).

  Returns:
    The arrays as a StandardSave item, the metadata as a JsonSave item.

  Raises:
    ValueError: for a state entry that is neither of these, or a snapshot
      that `to_nested_dict` rejects.
  """
  tree, meta = _pack(state)
  # In the same commit as the arrays: a complete step always has them.
  meta['checksums'] = integrity.checksums(tree)
  meta.update(extra_meta or {})
  return ocp.args.Composite(**{_STATE: ocp.args.StandardSave(tree),
                               _META: ocp.args.JsonSave(meta)})


def write_step(step_dir: epath.Path, state: ml_collections.ConfigDict,
               writer: ocp.Checkpointer,
               extra_meta: Optional[Mapping[str, Any]] = None) -> None:
  """Writes `state` (see `save_args`) as the step directory `step_dir`
  without a series manager (`writer` from `orbax_checkpointer`); an existing
  step is overwritten."""
  writer.save(step_dir, args=save_args(state, extra_meta), force=True)


def array_bytes(state: ml_collections.ConfigDict) -> int:
  """Bytes of the arrays `save_args` would write for `state`."""
  return sum(np.asarray(leaf).nbytes
             for _, leaf in integrity.flat_leaves(_pack(state)[0]))


def _older_hint(step_dir: epath.Path) -> str:
  older = [s for s in complete_steps(step_dir.parent)
           if s < int(step_dir.name)] if step_dir.name.isdigit() else []
  return (f' Restore the previous step instead: '
          f'{step_dir.parent / str(older[-1])}' if older else '')


def read_step(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """Reads one complete step of a series and verifies its checksums.

  Transient storage errors are retried (`integrity.with_retries`).

  Args:
    manager: the series' `series_manager`.
    step: a complete step of it.

  Returns:
    {'global_step': int, 'train_step_rng': as saved (typed keys as their
     data; see `wrap_rng`) or None, 'experiment_module': {name: nested dicts
     of NumPy arrays, or None}, 'path': the step directory as a string,
     '_meta': the raw metadata, plus the scalars and strings saved}.

  Raises:
    integrity.CorruptCheckpointError: if the files are missing, undecodable
      or fail their checksums; the message names the previous step to try.
    integrity.UnavailableCheckpointError: if the storage kept failing.
  """
  step_dir = manager.directory / STEPS.build_name(step)

  def restore():
    return manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(),
        _META: ocp.args.JsonRestore()}))

  try:
    restored = integrity.with_retries(restore, step_dir)
    state, meta = restored[_STATE], restored[_META]
    if not isinstance(meta, Mapping) or meta.get('format') != _FORMAT_VERSION:
      raise ValueError(f'unknown checkpoint metadata {meta!r}')
    integrity.verify({k: state.get(k) for k in ('experiment_module',
                                                'train_step_rng')},
                     meta.get('checksums'), step_dir)
  except integrity.UnavailableCheckpointError:
    raise
  except integrity.CorruptCheckpointError as e:
    raise integrity.CorruptCheckpointError(
        f'{e}{_older_hint(step_dir)}', e.kind) from e
  except Exception as e:  # pylint: disable=broad-exception-caught
    logging.debug('Reading %s failed', step_dir, exc_info=True)
    raise integrity.CorruptCheckpointError(
        f'Checkpoint {step_dir} is unreadable or corrupt '
        f'({integrity.one_line(e)}).{_older_hint(step_dir)}') from e
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


def wrap_rng(rng: Any, meta: Mapping[str, Any]) -> Any:
  """Typed PRNG keys were saved as their data; wraps them back."""
  impl = meta.get('train_step_rng_impl')
  if impl and rng is not None:
    return jax.random.wrap_key_data(rng, impl=impl)
  return rng
