"""DeepMind's released Perceiver IO ImageNet checkpoints, as our parameters.

DeepMind published three ImageNet checkpoints of Perceiver IO (P2 Tab. 5),
`imagenet_{fourier_position_encoding,conv_preprocessing,
learned_position_encoding}.pystate`. Each file is a pickle of

  {'params': {module: {name: np.ndarray}}, 'state': {module: {...}}}

keyed by the Haiku names that deepmind-research `perceiver/perceiver.py` and
`perceiver/io_processors.py` give their modules when built as in
`perceiver/train/experiment.py` and `colabs/imagenet_classification.ipynb`
(ImagePreprocessor, PerceiverEncoder, ClassificationDecoder, Perceiver).

Each file maps onto a preset of `configs/imagenet.py`, by renaming alone
(`NAME_TABLE`, `STATE_TABLE`): every array keeps its shape and layout (both
sides use hk.Linear's `w` [in, out], hk.Conv2D's `w` [h, w, in, out],
hk.LayerNorm's and hk.BatchNorm's `scale`, `offset`):

  fourier_position_encoding   p2                136 arrays, 48,440,627
                                                params, no state
  conv_preprocessing          p2,prep=conv      139 arrays, 48,646,522
                                                params; state: BatchNorm's
                                                moving mean and variance
  learned_position_encoding   p2,pos=learned    141 arrays, 62,255,848
                                                params, no state

The conv file's state is that of hk.BatchNorm, whose two
hk.ExponentialMovingAverage modules (`.../batchnorm/~/mean_ema`, `var_ema`)
each hold `counter`, `hidden` and `average`; ours are the same modules, so
the state is renamed like the parameters.

Names cannot check the settings that own no parameters; they must match the
release, as p2's do: 1 cross-attend head and 8 self-attend heads, the block
of 6 self-attends applied 8 times with shared weights, the decoder's query
residual (on in the Fourier and conv releases, off in the learned one), 64
Fourier bands at max resolution 224 (56 for conv, over its 56 x 56 grid),
the conv's BatchNorm decay 0.9 and epsilon 1e-5, LayerNorm epsilon 1e-5,
and a decoder query as wide as the latents (1024; for other widths the two
decoders' attention widths differ, which shows as mis-shaped names). On a
small config of p2's structure with random weights (LayerNorms included),
our model on the renamed parameters gave the logits of DeepMind's code to
1e-6 relative; likewise the conv variant (`p2,prep=conv,debug`, eval mode
on trained-into BatchNorm state) and the learned one (`p2,pos=learned,
debug`), to 3e-7 (checked once, outside the tests, which do not depend on
deepmind-research).

Safety: unpickling runs whatever code the file names. By default the file is
read by a restricted unpickler that resolves only the globals a pickle of
dicts, lists, numbers and NumPy arrays needs (`_safe_globals`, NumPy 1.x
and 2.x module paths alike) and raises `UnsafePickleError` naming any other
global before anything is called. `allow_unsafe_pickle=True` uses plain
`pickle.load`, which runs such code: only for files you trust (e.g. one
pickled with jax.Array leaves, which name jax's own reconstructor).
"""

import codecs
import collections
import importlib
import os
import pickle
from typing import Any, Mapping, Optional, Sequence

from etils import epath
import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from perceiver_jax import models

Name = tuple[str, str]  # (module, parameter), as in a Haiku params dict.

# One row per module: (DeepMind's module, ours, {DeepMind's param: ours}).
# In rows of the block of self-attends, {s} is the suffix Haiku gives
# DeepMind's k-th SelfAttention ('', '_1', '_2', ...) and {k} our index k.
# Within a DeepMind attention block, Haiku numbers the layers in the order
# they are created: CrossAttention makes `attention` (its linear, linear_1,
# linear_2, linear_3 = query, key, value, output), then layer_norm (query),
# layer_norm_1 (inputs), then `mlp` (linear, linear_1) and layer_norm_2;
# SelfAttention makes layer_norm first, then attention, mlp, layer_norm_1.
# The image preprocessor's modules: Conv2DDownsample (conv variant) and the
# 1x1 conv (learned variant) are made in ImagePreprocessor.__init__, the
# position encoding (and its projector) in its `_build_network_inputs`,
# which Haiku names `~_build_network_inputs`.
_LINEAR = {'w': 'w', 'b': 'b'}
_NORM = {'scale': 'scale', 'offset': 'offset'}
_EMA = {'counter': 'counter', 'hidden': 'hidden', 'average': 'average'}
_DM_PRE = 'image_preprocessor'
_DM_CONV = f'{_DM_PRE}/~/conv2_d_downsample'
_DM_POS = f'{_DM_PRE}/~_build_network_inputs'
# pylint: disable=line-too-long
NAME_TABLE: tuple[tuple[str, str, Mapping[str, str]], ...] = (
    # Image preprocessor (none for the Fourier variant, which has none).
    (f'{_DM_CONV}/~/conv', 'preprocessor/conv', {'w': 'w'}),
    (f'{_DM_CONV}/~/batchnorm', 'preprocessor/batchnorm', _NORM),
    (f'{_DM_PRE}/~/conv2_d', 'preprocessor/conv1x1', _LINEAR),
    (f'{_DM_POS}/trainable_position_encoding', 'preprocessor/position_encoding', {'pos_embs': 'pos_embs'}),
    (f'{_DM_POS}/position_encoding_projector/linear', 'preprocessor/position_projection', _LINEAR),
    # Encoder: the latent array and the single cross-attend.
    ('perceiver_encoder/~/trainable_position_encoding', 'encoder', {'pos_embs': 'latents'}),
    ('perceiver_encoder/~/cross_attention/layer_norm', 'encoder/~/cross_attend_0/~/query_norm', _NORM),
    ('perceiver_encoder/~/cross_attention/layer_norm_1', 'encoder/~/cross_attend_0/~/input_norm', _NORM),
    ('perceiver_encoder/~/cross_attention/attention/linear', 'encoder/~/cross_attend_0/~/attention/~/query', _LINEAR),
    ('perceiver_encoder/~/cross_attention/attention/linear_1', 'encoder/~/cross_attend_0/~/attention/~/key', _LINEAR),
    ('perceiver_encoder/~/cross_attention/attention/linear_2', 'encoder/~/cross_attend_0/~/attention/~/value', _LINEAR),
    ('perceiver_encoder/~/cross_attention/attention/linear_3', 'encoder/~/cross_attend_0/~/attention/~/output', _LINEAR),
    ('perceiver_encoder/~/cross_attention/layer_norm_2', 'encoder/~/cross_attend_0/~/mlp_norm', _NORM),
    ('perceiver_encoder/~/cross_attention/mlp/linear', 'encoder/~/cross_attend_0/~/mlp/hidden', _LINEAR),
    ('perceiver_encoder/~/cross_attention/mlp/linear_1', 'encoder/~/cross_attend_0/~/mlp/output', _LINEAR),
    # Encoder: the shared block of self-attends (ours: latent_transformer).
    ('perceiver_encoder/~/self_attention{s}/layer_norm', 'encoder/~/latent_transformer/~/latent_block_{k}/~/attention_norm', _NORM),
    ('perceiver_encoder/~/self_attention{s}/attention/linear', 'encoder/~/latent_transformer/~/latent_block_{k}/~/attention/~/query', _LINEAR),
    ('perceiver_encoder/~/self_attention{s}/attention/linear_1', 'encoder/~/latent_transformer/~/latent_block_{k}/~/attention/~/key', _LINEAR),
    ('perceiver_encoder/~/self_attention{s}/attention/linear_2', 'encoder/~/latent_transformer/~/latent_block_{k}/~/attention/~/value', _LINEAR),
    ('perceiver_encoder/~/self_attention{s}/attention/linear_3', 'encoder/~/latent_transformer/~/latent_block_{k}/~/attention/~/output', _LINEAR),
    ('perceiver_encoder/~/self_attention{s}/layer_norm_1', 'encoder/~/latent_transformer/~/latent_block_{k}/~/mlp_norm', _NORM),
    ('perceiver_encoder/~/self_attention{s}/mlp/linear', 'encoder/~/latent_transformer/~/latent_block_{k}/~/mlp/hidden', _LINEAR),
    ('perceiver_encoder/~/self_attention{s}/mlp/linear_1', 'encoder/~/latent_transformer/~/latent_block_{k}/~/mlp/output', _LINEAR),
    # Decoder: ClassificationDecoder's BasicDecoder (ours: the query decoder).
    ('classification_decoder/~/basic_decoder/~/trainable_position_encoding', 'decoder/~/query_decoder', {'pos_embs': 'queries'}),
    ('classification_decoder/~/basic_decoder/cross_attention/layer_norm', 'decoder/~/query_decoder/~/cross_attend/~/query_norm', _NORM),
    ('classification_decoder/~/basic_decoder/cross_attention/layer_norm_1', 'decoder/~/query_decoder/~/cross_attend/~/input_norm', _NORM),
    ('classification_decoder/~/basic_decoder/cross_attention/attention/linear', 'decoder/~/query_decoder/~/cross_attend/~/attention/~/query', _LINEAR),
    ('classification_decoder/~/basic_decoder/cross_attention/attention/linear_1', 'decoder/~/query_decoder/~/cross_attend/~/attention/~/key', _LINEAR),
    ('classification_decoder/~/basic_decoder/cross_attention/attention/linear_2', 'decoder/~/query_decoder/~/cross_attend/~/attention/~/value', _LINEAR),
    ('classification_decoder/~/basic_decoder/cross_attention/attention/linear_3', 'decoder/~/query_decoder/~/cross_attend/~/attention/~/output', _LINEAR),
    ('classification_decoder/~/basic_decoder/cross_attention/layer_norm_2', 'decoder/~/query_decoder/~/cross_attend/~/mlp_norm', _NORM),
    ('classification_decoder/~/basic_decoder/cross_attention/mlp/linear', 'decoder/~/query_decoder/~/cross_attend/~/mlp/hidden', _LINEAR),
    ('classification_decoder/~/basic_decoder/cross_attention/mlp/linear_1', 'decoder/~/query_decoder/~/cross_attend/~/mlp/output', _LINEAR),
    ('classification_decoder/~/basic_decoder/output', 'decoder/~/query_decoder/output', _LINEAR),
)
# Haiku state, as NAME_TABLE: the conv variant's BatchNorm moving averages.
STATE_TABLE: tuple[tuple[str, str, Mapping[str, str]], ...] = (
    (f'{_DM_CONV}/~/batchnorm/~/mean_ema', 'preprocessor/batchnorm/~/mean_ema', _EMA),
    (f'{_DM_CONV}/~/batchnorm/~/var_ema', 'preprocessor/batchnorm/~/var_ema', _EMA),
)
# pylint: enable=line-too-long
# The released models' input (the default input_shape).
RELEASED_INPUT_SHAPE = (224, 224, 3)

# Messages list at most this many names per kind of problem.
_MAX_LISTED = 30


class CheckpointError(ValueError):
  """A file that is not a readable released checkpoint."""


class UnsafePickleError(CheckpointError):
  """The pickle names a global that a checkpoint of arrays does not need."""


class CheckpointMismatch(ValueError):
  """The checkpoint's names or shapes differ from the config's model.

  Attributes:
    missing: [(DeepMind name, our name, expected shape)] absent from the file.
    extra: [(DeepMind name, shape)] in the file that the model does not have.
  State entries are listed likewise, their names prefixed with 'state: '.
    mis_shaped: [(DeepMind name, our name, file's dtype and shape, expected
      dtype and shape)], the latter two as strings like 'float32[261, 1024]'.
    unmapped: [(our name, shape)] of the model that no DeepMind parameter
      maps to (a config the release has no counterpart for).
  Names are 'module/param' strings.
  """

  def __init__(self, what: str, *, missing=(), extra=(), mis_shaped=(),
               unmapped=()):
    self.missing, self.extra = list(missing), list(extra)
    self.mis_shaped, self.unmapped = list(mis_shaped), list(unmapped)
    sections = [
        ('missing from the checkpoint (DeepMind name -> ours, expected shape)',
         [f'{d} -> {o} {list(s)}' for d, o, s in self.missing]),
        ('in the checkpoint but not in the model (DeepMind name, shape)',
         [f'{d} {list(s)}' for d, s in self.extra]),
        ('different shapes (DeepMind name -> ours: checkpoint vs expected)',
         [f'{d} -> {o}: {got} vs {want}'
          for d, o, got, want in self.mis_shaped]),
        ('in the model with no DeepMind counterpart (ours, shape)',
         [f'{o} {list(s)}' for o, s in self.unmapped]),
    ]
    lines = [what]
    for title, entries in sections:
      if entries:
        lines.append(f'{len(entries)} {title}:')
        lines += [f'  {e}' for e in entries[:_MAX_LISTED]]
        if len(entries) > _MAX_LISTED:
          lines.append(f'  ... and {len(entries) - _MAX_LISTED} more')
    super().__init__('\n'.join(lines))


def _flat(name: Name) -> str:
  return '/'.join(name)


# The name table for one config.


def _self_attention_suffix(k: int) -> str:
  """Haiku's suffix for the k-th module of one class in a scope."""
  return '' if k == 0 else f'_{k}'


def _expand(rows: Sequence[tuple[str, str, Mapping[str, str]]],
            num_self_attends: int) -> list[tuple[Name, Name]]:
  table = []
  for theirs, ours, names in rows:
    indices = range(num_self_attends) if '{k}' in ours else (0,)
    for k in indices:
      dm_module = theirs.format(s=_self_attention_suffix(k))
      our_module = ours.format(k=k)
      for dm_name, our_name in names.items():
        table.append(((dm_module, dm_name), (our_module, our_name)))
  return table


def name_table(model_config: ml_collections.ConfigDict
               ) -> list[tuple[Name, Name]]:
  """NAME_TABLE expanded for a config: [(DeepMind's name, ours)].

  Args:
    model_config: the model section; its encoder.num_self_attends_per_block
      sets how many self-attends the block has, its preprocessor which
      preprocessor rows apply.

  Returns:
    (module, param) pairs, DeepMind's first, in NAME_TABLE's order: the rows
    whose names the config's model has.
  """
  return _rows_of(_expand(NAME_TABLE, _num_self_attends(model_config)),
                  model_shapes(model_config)[0])


def state_name_table(model_config: ml_collections.ConfigDict
                     ) -> list[tuple[Name, Name]]:
  """STATE_TABLE expanded as `name_table` expands NAME_TABLE."""
  return _rows_of(_expand(STATE_TABLE, _num_self_attends(model_config)),
                  model_shapes(model_config)[1])


def _num_self_attends(model_config: ml_collections.ConfigDict) -> int:
  return model_config.encoder.num_self_attends_per_block


def _rows_of(table: list[tuple[Name, Name]], ours: Mapping[Name, Any]
             ) -> list[tuple[Name, Name]]:
  """The rows of `table` whose names a model (`ours`) has: rows of other
  variants' preprocessors, or of more self-attends, are dropped."""
  return [(theirs, our) for theirs, our in table if our in ours]


def model_shapes(model_config: ml_collections.ConfigDict,
                 input_shape: Optional[Sequence[int]] = None
                 ) -> tuple[dict[Name, jax.ShapeDtypeStruct],
                            dict[Name, jax.ShapeDtypeStruct]]:
  """Our model's parameters and state for a config, via jax.eval_shape.

  Args:
    model_config: the model section.
    input_shape: one example's shape; default RELEASED_INPUT_SHAPE. Shapes
      depend on it only for a learned position encoding.

  Returns:
    ({(module, param): shape and dtype}, the same for the state).
  """
  forward = models.make_forward_with_state(model_config)
  inputs = jax.ShapeDtypeStruct(
      (1, *(input_shape or RELEASED_INPUT_SHAPE)), jnp.float32)
  # Training mode: BatchNorm creates its moving averages there.
  params, state = jax.eval_shape(
      lambda x: forward.init(jax.random.key(0), x, is_training=True), inputs)
  return _flat_arrays(params), _flat_arrays(state)


def parameter_shapes(model_config: ml_collections.ConfigDict,
                     input_shape: Optional[Sequence[int]] = None
                     ) -> dict[Name, jax.ShapeDtypeStruct]:
  """The parameters of `model_shapes`."""
  return model_shapes(model_config, input_shape)[0]


# Renaming.


def _rename(released: Mapping[Name, Any],
            expected: Mapping[Name, jax.ShapeDtypeStruct],
            table: Sequence[tuple[Name, Name]], prefix: str):
  """Renames `released` by `table` to the `expected` names and dtypes.

  Returns:
    ({module: {name: np.ndarray}}, missing, extra, mis_shaped, unmapped) as
    CheckpointMismatch lists them, names prefixed with `prefix`.
  """
  # Rows the config does not build: their released names are extra.
  table = _rows_of(table, expected)
  mapped = {ours for _, ours in table}
  known = {theirs for theirs, _ in table}
  flat = lambda name: prefix + _flat(name)
  missing, mis_shaped = [], []
  tree: dict[str, dict[str, np.ndarray]] = {}
  for theirs, ours in table:
    want = expected[ours]
    if theirs not in released:
      missing.append((flat(theirs), flat(ours), want.shape))
      continue
    value = released[theirs]
    if value.shape != want.shape or not _castable(value.dtype, want.dtype):
      mis_shaped.append((flat(theirs), flat(ours),
                         _shape_and_dtype(value), _shape_and_dtype(want)))
      continue
    tree.setdefault(ours[0], {})[ours[1]] = np.asarray(value, want.dtype)
  extra = [(flat(name), value.shape) for name, value in released.items()
           if name not in known]
  unmapped = [(flat(name), value.shape) for name, value in expected.items()
              if name not in mapped]
  return tree, missing, extra, mis_shaped, unmapped


def from_deepmind(checkpoint: Mapping[str, Any],
                  model_config: ml_collections.ConfigDict, *,
                  input_shape: Optional[Sequence[int]] = None
                  ) -> tuple[hk.Params, hk.State]:
  """Renames a released checkpoint's arrays to ours.

  Args:
    checkpoint: {'params': {module: {name: array}}, 'state': {...}} with
      DeepMind's names, as `read_pystate` returns it.
    model_config: the model section the parameters are for.
    input_shape: see `model_shapes`.

  Returns:
    (params, state), {module: {name: np.ndarray}} with our names for
    `models.make_forward_with_state(model_config)` (params alone also for
    `make_forward` where the model has no state), cast to its dtypes; state
    is {} for a stateless model.

  Raises:
    CheckpointMismatch: listing missing, extra and mis-shaped names (of
      params and state), and names of the config's model that the release
      has no counterpart for.
  """
  expected_params, expected_state = model_shapes(model_config, input_shape)
  num_self_attends = _num_self_attends(model_config)
  params, *problems = _rename(
      _flat_arrays(checkpoint['params']), expected_params,
      _expand(NAME_TABLE, num_self_attends), '')
  state, *state_problems = _rename(
      _flat_arrays(checkpoint.get('state') or {}), expected_state,
      _expand(STATE_TABLE, num_self_attends), 'state: ')
  missing, extra, mis_shaped, unmapped = (
      a + b for a, b in zip(problems, state_problems))
  if missing or extra or mis_shaped or unmapped:
    raise CheckpointMismatch(
        'The DeepMind checkpoint does not match the config\'s model (another '
        'released variant, or a config other than the release\'s?).',
        missing=missing, extra=extra, mis_shaped=mis_shaped,
        unmapped=unmapped)
  return params, state


def to_deepmind(params: hk.Params, model_config: ml_collections.ConfigDict,
                state: Optional[hk.State] = None) -> dict[str, Any]:
  """Our parameters with DeepMind's names (the inverse of from_deepmind).

  Args:
    params: {module: {name: array}} of `models.make_forward_with_state(
      model_config)`.
    model_config: the model section.
    state: that model's state ({} or None for a stateless model).

  Returns:
    {'params': {module: {name: np.ndarray}}, 'state': likewise}, the
    released files' layout.

  Raises:
    CheckpointMismatch: if `params` or `state` lacks a name of the tables'
      rows for the model, or has one the tables do not map.
  """
  expected = model_shapes(model_config)  # Names only: any input works.
  num_self_attends = _num_self_attends(model_config)
  result = {}
  missing, unmapped = [], []
  for part, tree, table, names, prefix in (
      ('params', params, NAME_TABLE, expected[0], ''),
      ('state', state or {}, STATE_TABLE, expected[1], 'state: ')):
    ours = {name: np.asarray(jax.device_get(value))
            for name, value in _flat_arrays(tree).items()}
    rows = _rows_of(_expand(table, num_self_attends), names)
    mapped = {our for _, our in rows}
    released: dict[str, dict[str, np.ndarray]] = {}
    for theirs, our in rows:
      if our not in ours:
        missing.append((prefix + _flat(theirs), prefix + _flat(our), ()))
        continue
      released.setdefault(theirs[0], {})[theirs[1]] = ours[our]
    unmapped += [(prefix + _flat(name), value.shape)
                 for name, value in ours.items() if name not in mapped]
    result[part] = released
  if missing or unmapped:
    raise CheckpointMismatch(
        'These parameters do not have the released model\'s names.',
        missing=missing, unmapped=unmapped)
  return result


def _castable(got: np.dtype, want: np.dtype) -> bool:
  return got == want or any(
      np.issubdtype(got, kind) and np.issubdtype(want, kind)
      for kind in (np.floating, np.integer))


def _shape_and_dtype(x: Any) -> str:
  return f'{np.dtype(x.dtype).name}{list(x.shape)}'


def _flat_arrays(tree: Mapping[str, Mapping[str, Any]]) -> dict[Name, Any]:
  return {(module, name): value for module, values in tree.items()
          for name, value in values.items()}


# Files.


def _numpy_core(submodule: str):
  """numpy._core.<submodule> (NumPy 2) or numpy.core.<submodule> (1.x)."""
  try:
    return importlib.import_module(f'numpy._core.{submodule}')
  except ImportError:
    return importlib.import_module(f'numpy.core.{submodule}')


def _safe_globals() -> dict[tuple[str, str], Any]:
  """(module, name) a pickle of dicts, lists, numbers and arrays names."""
  multiarray, numeric = _numpy_core('multiarray'), _numpy_core('numeric')
  allowed = {
      ('numpy', 'ndarray'): np.ndarray,
      ('numpy', 'dtype'): np.dtype,
      ('collections', 'OrderedDict'): collections.OrderedDict,
      # Protocol 2 writes bytes as _codecs.encode(text, 'latin1').
      ('_codecs', 'encode'): codecs.encode,
  }
  # NumPy 1.x writes numpy.core.*, 2.x numpy._core.*; both resolve to the
  # installed NumPy's functions, without importing the module named.
  # pylint: disable=protected-access
  for core in ('numpy.core', 'numpy._core'):
    allowed[(f'{core}.multiarray', '_reconstruct')] = multiarray._reconstruct
    allowed[(f'{core}.multiarray', 'scalar')] = multiarray.scalar
    # Protocol 5 writes contiguous arrays this way.
    allowed[(f'{core}.numeric', '_frombuffer')] = numeric._frombuffer
  # pylint: enable=protected-access
  return allowed


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only `_safe_globals`; any other global is refused unrun."""

  def __init__(self, file, path: str):
    super().__init__(file)
    self._path = path
    self._allowed = _safe_globals()

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in self._allowed:
      return self._allowed[(module, name)]
    raise UnsafePickleError(
        f'{self._path} names the global {module}.{name}, which a checkpoint '
        'of arrays does not need; refused without running it. If you trust '
        'the file, pass allow_unsafe_pickle=True (--allow_unsafe_pickle).')


def read_pystate(path: epath.PathLike, *, allow_unsafe_pickle: bool = False
                 ) -> dict[str, Any]:
  """Reads a released .pystate file.

  Args:
    path: a local path or gs:// URL.
    allow_unsafe_pickle: unpickle with `pickle.load`, which runs any code
      the file names (see the module docstring). Only for trusted files.

  Returns:
    {'params': {module: {name: np.ndarray}}, 'state': likewise ({} where
    the file has none)}.

  Raises:
    FileNotFoundError: if there is no such file.
    UnsafePickleError: for a global outside the allowed ones.
    CheckpointError: for a truncated file, a file that is not a pickle, or a
      pickle that is not such a dict.
  """
  path = epath.Path(path)
  with path.open('rb') as f:
    try:
      if allow_unsafe_pickle:
        raw = pickle.load(f)
      else:
        raw = _RestrictedUnpickler(f, str(path)).load()
    except UnsafePickleError:
      raise
    except EOFError as e:
      raise CheckpointError(
          f'{path} is truncated or empty (an incomplete download?): {e}'
      ) from e
    except pickle.UnpicklingError as e:
      if 'truncated' in str(e):
        raise CheckpointError(
            f'{path} is truncated (an incomplete download?): {e}') from e
      raise CheckpointError(
          f'{path} is not a pickle (expected a released .pystate): {e}'
      ) from e
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise CheckpointError(
          f'{path} is a corrupt pickle ({type(e).__name__}: {e}).') from e
  return _check_layout(raw, str(path))


def _check_layout(raw: Any, path: str) -> dict[str, Any]:
  """`raw` as {'params': {module: {name: array}}, 'state': ...} or an error."""
  if not isinstance(raw, Mapping) or 'params' not in raw:
    what = (f'a dict with keys {sorted(map(str, raw))}'
            if isinstance(raw, Mapping) else f'a {type(raw).__name__}')
    raise CheckpointError(
        f'{path} holds {what}; a released checkpoint is a dict with '
        "'params' (and 'state'): {module: {name: array}}.")
  result = {}
  for part in ('params', 'state'):
    tree = raw.get(part) or {}
    if not isinstance(tree, Mapping):
      raise CheckpointError(f"{path}: '{part}' is a {type(tree).__name__}, "
                            'expected {module: {name: array}}.')
    result[part] = {}
    for module, values in tree.items():
      if not isinstance(module, str) or not isinstance(values, Mapping):
        raise CheckpointError(
            f"{path}: '{part}' entry {module!r} is a "
            f'{type(values).__name__}, expected {{name: array}}.')
      arrays = {}
      for name, value in values.items():
        value = np.asarray(value) if hasattr(value, '__array__') else value
        if (not isinstance(value, np.ndarray) or
            value.dtype.kind not in 'fiub'):
          what = type(value).__name__
          if isinstance(value, np.ndarray):
            what += f' of {value.dtype}'
          raise CheckpointError(f'{path}: {part} {module}/{name} is a {what},'
                                ' expected a numeric array.')
        arrays[str(name)] = value
      result[part][module] = arrays
  return result


def load_checkpoint(path: epath.PathLike,
                    model_config: ml_collections.ConfigDict, *,
                    input_shape: Optional[Sequence[int]] = None,
                    allow_unsafe_pickle: bool = False
                    ) -> tuple[hk.Params, dict[str, Any]]:
  """Reads a released .pystate as parameters of our model.

    params, state = load_checkpoint(
        'imagenet_fourier_position_encoding.pystate',
        imagenet.get_config('p2').experiment_kwargs.config.model)
    logits = models.make_forward(model_config).apply(
        params, None, images, is_training=False)
    # The conv variant has state (BatchNorm's moving averages):
    logits, _ = models.make_forward_with_state(model_config).apply(
        params, state, None, images, is_training=False)

  Args:
    path: the .pystate file (local or gs://).
    model_config: the model section of the config to load into.
    input_shape: see `parameter_shapes`.
    allow_unsafe_pickle: see `read_pystate`: False (default) refuses any
      pickle that names code beyond NumPy's array reconstruction.

  Returns:
    (params, state) as `from_deepmind` returns them.

  Raises:
    FileNotFoundError, UnsafePickleError, CheckpointError: see read_pystate.
    CheckpointMismatch: see from_deepmind.
  """
  return from_deepmind(
      read_pystate(path, allow_unsafe_pickle=allow_unsafe_pickle),
      model_config, input_shape=input_shape)


def save_checkpoint(path: epath.PathLike, params: hk.Params,
                    state: Optional[Mapping[str, Any]],
                    model_config: ml_collections.ConfigDict) -> None:
  """Writes our parameters as a released-format .pystate file.

  The file appears complete or not at all: it is written next to `path` and
  renamed into place.

  Args:
    path: where to write (local or gs://).
    params: parameters of `models.make_forward(model_config)`.
    state: its state ({} or None for a stateless model).
    model_config: the model section.

  Raises:
    CheckpointMismatch: see to_deepmind.
  """
  tree = to_deepmind(params, model_config, state)
  path = epath.Path(path)
  tmp = path.parent / f'.{path.name}.tmp-{os.getpid()}'
  with tmp.open('wb') as f:
    pickle.dump(tree, f, protocol=4)
  tmp.rename(path)
