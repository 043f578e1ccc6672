"""Pytrees on disk: the step format of perceiver_jax checkpoints, via orbax.

A series directory (see `checkpointing`: `<root>/latest`, `<root>/best`, on a
local path or gs://...) holds one directory per saved step::

  <step>/state/                orbax PyTree: experiment_module (the
                               experiment's snapshot), train_step_rng
  <step>/meta/                 JSON: global_step, best metric, bookkeeping
  <step>/commit_success.txt    written by orbax when the step is complete

Integrity: the metadata also holds a CRC32 of every array
(`checkpoint_integrity`), committed with the arrays and checked by
`read_step`, and the resolved config of the run (`config_record`).

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp-<time>` and
renames it once complete (on GCS, which cannot rename, it writes
commit_success.txt last instead). A step counts only if its name is all digits
and it holds commit_success.txt, so a crash or SIGTERM mid-write leaves the
previous steps usable; the next writer of that series deletes the leftovers
(`remove_interrupted_writes`).

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
from typing import Any, Iterable, Mapping, Optional

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


# Directory scanning.


def as_path(path: PathLike) -> epath.Path:
  """`path` as an epath.Path; a local one with ~ expanded and made absolute
  (orbax's array writer rejects relative paths)."""
  text = os.fspath(path)
  if '://' in text:  # gs:// and other remote stores.
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_step_dir(path: epath.Path) -> bool:
  """Whether `path` names a step directory, complete or interrupted."""
  return (path.name.isdigit() or _TMP_MARKER in path.name or
          (path / _STATE).exists())


def is_complete_step(path: epath.Path) -> bool:
  """Whether `path` is a step directory whose write finished."""
  return (path.name.isdigit() and path.is_dir() and
          (path / _COMMIT_FILE).exists())


def complete_steps(series_dir: epath.Path) -> list[int]:
  """Ascending steps with a complete checkpoint; [] if there is no dir."""
  if not series_dir.is_dir():
    return []
  return sorted(int(p.name) for p in series_dir.iterdir()
                if is_complete_step(p))


def remove_interrupted_writes(series_dir: epath.Path) -> None:
  """Deletes what crashed writes left: tmp dirs, steps without commit."""
  if not series_dir.is_dir():
    return
  for path in series_dir.iterdir():
    if _TMP_MARKER in path.name or (
        path.name.isdigit() and not is_complete_step(path)):
      logging.warning('Removing interrupted checkpoint write %s.', path)
      path.rmtree(missing_ok=True)


# Reading and writing one step.


def orbax_checkpointer(all_processes: bool) -> ocp.Checkpointer:
  """A synchronous orbax Checkpointer for our two items (state, meta).

  Args:
    all_processes: every process calls save/restore together and orbax syncs
      them (process 0 writes). Otherwise this process works alone: no
      barriers with processes that never make the matching call.

  Returns:
    The checkpointer; close it when done (it holds asyncio machinery).
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


def write_step(step_dir: epath.Path, state: ml_collections.ConfigDict,
               writer: ocp.Checkpointer,
               extra_meta: Optional[Mapping[str, Any]] = None) -> None:
  """Writes jaxline's experiment state as the step directory `step_dir`.

  Args:
    step_dir: `<series>/<step>`; an existing one is overwritten.
    state: jaxline's state: global_step, experiment_module (its
      `snapshot_state()` is saved), optional train_step_rng, and scalars or
      strings (e.g. best_eval_metric_value), kept in the metadata.
    writer: from `orbax_checkpointer`.
    extra_meta: more JSON for the metadata (e.g. {'config': ...}).

  Raises:
    ValueError: for a state entry that is neither of these, or a snapshot
      that `to_nested_dict` rejects.
  """
  tree, meta = _pack(state)
  # In the same commit as the arrays: a complete step always has them.
  meta['checksums'] = integrity.checksums(tree)
  meta.update(extra_meta or {})
  writer.save(step_dir, args=ocp.args.Composite(**{
      _STATE: ocp.args.StandardSave(tree),
      _META: ocp.args.JsonSave(meta)}), force=True)


def array_bytes(state: ml_collections.ConfigDict) -> int:
  """Bytes of the arrays `write_step` would write for `state`."""
  return sum(np.asarray(leaf).nbytes
             for _, leaf in integrity.flat_leaves(_pack(state)[0]))


def read_meta(step_dir: epath.Path, reader: ocp.Checkpointer) -> dict:
  """The JSON metadata of a step; its 'extra' holds the saved scalars."""
  return reader.restore(
      step_dir, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
  )[_META]


def _older_hint(step_dir: epath.Path) -> str:
  older = [s for s in complete_steps(step_dir.parent)
           if s < int(step_dir.name)] if step_dir.name.isdigit() else []
  return (f' Restore the previous step instead: '
          f'{step_dir.parent / str(older[-1])}' if older else '')


def read_step(step_dir: epath.Path, reader: ocp.Checkpointer
              ) -> dict[str, Any]:
  """Reads one complete step and verifies its checksums.

  Transient storage errors are retried (`integrity.with_retries`).

  Args:
    step_dir: a complete step directory.
    reader: from `orbax_checkpointer`.

  Returns:
    {'global_step': int, 'train_step_rng': as saved (typed keys as their
     data; see `wrap_rng`) or None, 'experiment_module': {name: nested dicts
     of NumPy arrays, or None}, 'path': `step_dir` as a string, '_meta': the
     raw metadata, plus the scalars and strings `write_step` kept}.

  Raises:
    integrity.CorruptCheckpointError: if the files are missing, undecodable
      or fail their checksums; the message names the previous step to try.
    integrity.UnavailableCheckpointError: if the storage kept failing.
  """
  def restore():
    return reader.restore(step_dir, args=ocp.args.Composite(**{
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
