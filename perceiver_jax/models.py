"""Builds a Perceiver or one of P1's baselines from a `model` config section.

`type` (default 'perceiver') picks the model: 'perceiver', or a baseline of
P1 Tab. 1, 2 and 4 (MODEL_TYPES; perceiver_jax/modules/baselines.py):
'resnet' (hk.nets.ResNet; ResNet-50 by default), 'vit' or 'transformer' (a
Transformer over the M inputs as a set). A Perceiver's section has three
parts, each a ConfigDict whose fields are the
constructor arguments of the chosen class:
  preprocessor: `type` in PREPROCESSORS (+ `permutation_seed`, see below);
    for `type='multimodal'`, `modalities` maps names to such sections.
  encoder: PerceiverEncoder arguments (num_latents, latent_dim, ...).
  decoder: `type` in DECODERS ('average' = P1, 'query' = P2 classifier).
and one field of its own:
  backend: how the ops (attention, linear maps, LayerNorm) are computed,
    `perceiver_jax.ops.BACKENDS`: 'auto' (default; each platform's
    registered implementation, chosen when the program is lowered),
    'reference' (plain jnp everywhere) or 'cpu' (as 'auto', and an error if
    the CPU implementation does not load). Results agree to float32
    rounding.

A preprocessor's `permutation_seed` (int or None) applies one fixed
permutation of the M inputs after position features are attached: permuted
ImageNet (P1 Sec. 4.2, Tab. 2). Its `input_key` (optional) picks one entry
of dict-valued inputs (e.g. 'audio' of an AudioSet batch). The model's own
preprocessor keeps Fourier position features apart from the per-example
channels where it can (`byte_array`): same outputs, less memory.

A baseline's section has `preprocessor` (as above: the Perceiver's byte
array, Fourier features and permutation; for 'resnet' and 'vit' an image
preprocessor with prep_type='pixels', whose permuted [M, C] array the
network reshapes back to the [H, W, C] grid, P1 Sec. 4.2) and `network`
(the network's constructor arguments, num_classes among them; the grid
comes from the input), plus `backend`. Inputs without a grid of their own
(point clouds, P1 Tab. 4) give 'resnet' and 'vit' one with `grid`: a tuple
whose product is the number of points, filled row-major in the order the
points arrive.

State: a model with BatchNorm (a ResNet baseline, or an image preprocessor
with prep_type='conv' and conv_norm='batch_norm', the released conv model)
keeps its moving averages as Haiku state (`has_state`). `make_forward_with_state` builds any
model; `make_forward` builds stateless ones and refuses the others.
"""

from typing import Any, Callable, Mapping, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections

from perceiver_jax import ops
from perceiver_jax.modules import audio_video
from perceiver_jax.modules import baselines
from perceiver_jax.modules import multimodal
from perceiver_jax.modules import perceiver
from perceiver_jax.modules import point_cloud
from perceiver_jax.modules import preprocessors

PREPROCESSORS: Mapping[str, Callable[..., Any]] = {
    'image': preprocessors.ImagePreprocessor,
    'audio': audio_video.AudioPreprocessor,
    'spectrogram': audio_video.SpectrogramPreprocessor,
    'video': audio_video.VideoPreprocessor,
    'point_cloud': point_cloud.PointCloudPreprocessor,
}
# Those that can keep Fourier position features apart from the per-example
# channels (`ops.byte_array.SplitByteArray`); build_model asks them to.
SPLITS_POSITIONS = ('image', 'audio', 'spectrogram', 'video')

BASELINES: Mapping[str, Callable[..., Any]] = {
    'resnet': baselines.ResNet,
    'vit': baselines.ViT,
    'transformer': baselines.PixelTransformer,
}
MODEL_TYPES = ('perceiver',) + tuple(BASELINES)
# Baselines that read the byte array as the image grid (a `grid` argument).
GRID_BASELINES = ('resnet', 'vit')
# Baselines with Haiku state (BatchNorm's moving averages).
STATEFUL_BASELINES = ('resnet',)

DECODERS: Mapping[str, Callable[..., Any]] = {
    'average': perceiver.AverageDecoder,
    'query': perceiver.ClassificationQueryDecoder,
}


class _SelectInput(hk.Module):
  """Feeds `inputs[key]` of dict-valued inputs to a preprocessor."""

  def __init__(self, preprocessor: Callable[..., Any], key: str):
    super().__init__(name=None)
    self._preprocessor = preprocessor
    self._key = key

  def __call__(self, inputs: Any, *, is_training: bool):
    if not hasattr(inputs, 'keys') or self._key not in inputs:
      raise ValueError(f'Expected a dict of inputs with key {self._key!r}, '
                       f'got {jax.tree.map(jnp.shape, inputs)}.')
    return self._preprocessor(inputs[self._key], is_training=is_training)


def _kwargs(section: ml_collections.ConfigDict, *drop: str) -> dict[str, Any]:
  kwargs = section.to_dict()
  for key in drop:
    kwargs.pop(key, None)
  return kwargs


def _lookup(table: Mapping[str, Any], kind: str, what: str):
  if kind not in table:
    raise ValueError(
        f'Unknown {what} type {kind!r}; expected one of {sorted(table)}.')
  return table[kind]


def build_preprocessor(section: ml_collections.ConfigDict,
                       name: Optional[str] = None, *,
                       select_input: bool = True,
                       split_positions: bool = False):
  """Returns the preprocessor module a config section describes.

  Args:
    section: the preprocessor config section.
    name: module name.
    select_input: honour `input_key`; False for the modalities of a
      multimodal preprocessor, which receive their own input already.
    split_positions: where the preprocessor can (SPLITS_POSITIONS), return
      byte arrays with Fourier features as `ops.byte_array.SplitByteArray`.
  """
  kind = section.type
  if kind == 'multimodal':
    modalities = {
        modality: build_preprocessor(sub, name=f'{modality}_preprocessor',
                                     select_input=False)
        for modality, sub in section.modalities.items()}
    module = multimodal.MultimodalPreprocessor(
        modalities, name=name,
        **_kwargs(section, 'type', 'modalities', 'permutation_seed',
                  'input_key'))
  else:
    cls = _lookup(PREPROCESSORS, kind, 'preprocessor')
    kwargs = _kwargs(section, 'type', 'permutation_seed', 'input_key')
    if split_positions and kind in SPLITS_POSITIONS:
      kwargs['split_positions'] = True
    module = cls(name=name, **kwargs)
  if select_input and kind != 'multimodal' and section.get('input_key'):
    module = _SelectInput(module, section.input_key)
  seed = section.get('permutation_seed')
  if seed is not None:
    module = preprocessors.PermutedPreprocessor(module, seed,
                                                name='permutation')
  return module


def model_type(config: ml_collections.ConfigDict) -> str:
  """The `type` of a model section ('perceiver' when absent).

  Raises:
    ValueError: for a type not in MODEL_TYPES.
  """
  kind = config.get('type', 'perceiver')
  if kind not in MODEL_TYPES:
    raise ValueError(f'Unknown model type {kind!r}; expected one of '
                     f'{MODEL_TYPES}.')
  return kind


def build_baseline(config: ml_collections.ConfigDict) -> baselines.Baseline:
  """Returns the baseline of `config` (the model section); call in hk.

  Raises:
    ValueError: a grid baseline whose preprocessor neither feeds one byte
      array entry per pixel nor comes with a `grid`.
  """
  kind = model_type(config)
  pre = config.preprocessor
  grid = config.get('grid')
  pixels = pre.type == 'image' and pre.get('prep_type', 'pixels') == 'pixels'
  if kind in GRID_BASELINES and not pixels and grid is None:
    raise ValueError(
        f'model.type={kind!r} reshapes the byte array to a grid: it needs '
        "preprocessor.type='image' with prep_type='pixels', or a model.grid "
        f"(for point clouds), got type={pre.type!r}, "
        f"prep_type={pre.get('prep_type')!r}.")
  if grid is not None and kind not in GRID_BASELINES:
    raise ValueError(f'model.grid is for {GRID_BASELINES}; model.type='
                     f'{kind!r} reads the byte array as a set.')
  cls = BASELINES[kind]
  kwargs = _kwargs(config.network)

  def make_network(input_grid):
    if kind in GRID_BASELINES:
      return cls(grid=input_grid, name=kind, **kwargs)
    return cls(name=kind, **kwargs)

  return baselines.Baseline(
      build_preprocessor(pre, name='preprocessor'), make_network,
      grid=None if grid is None else tuple(grid), name='baseline')


def build_model(config: ml_collections.ConfigDict):
  """Returns the model of `config` (the model section); call in hk.

  A `perceiver.Perceiver`, or for a baseline type a `baselines.Baseline`.
  """
  if model_type(config) != 'perceiver':
    return build_baseline(config)
  decoder_cls = _lookup(DECODERS, config.decoder.type, 'decoder')
  return perceiver.Perceiver(
      preprocessor=build_preprocessor(config.preprocessor,
                                      name='preprocessor',
                                      split_positions=True),
      encoder=perceiver.PerceiverEncoder(
          name='encoder', **_kwargs(config.encoder)),
      decoder=decoder_cls(name='decoder', **_kwargs(config.decoder, 'type')),
      name='perceiver')


# Fields of earlier versions -> what replaced them.
_REMOVED_FIELDS = {'cpu_matmul': 'backend', 'fused_cpu_attention': 'backend'}


def _check_no_removed_fields(config: ml_collections.ConfigDict) -> None:
  for old, new in _REMOVED_FIELDS.items():
    if old in config:
      raise ValueError(
          f'model.{old} was removed; set model.{new} instead (one of '
          f'{ops.BACKENDS}).')


def has_state(config: ml_collections.ConfigDict) -> bool:
  """Whether the model of a model section has Haiku state (BatchNorm)."""
  if model_type(config) in STATEFUL_BASELINES:
    return True

  def stateful(section):
    if section.type == 'multimodal':
      return any(stateful(sub) for sub in section.modalities.values())
    return section.get('conv_norm', 'none') == 'batch_norm'

  return stateful(config.preprocessor)


def _forward_fn(config: ml_collections.ConfigDict
                ) -> Callable[[Any, bool], jax.Array]:
  """`inputs, is_training -> logits`, to be transformed by Haiku."""
  _check_no_removed_fields(config)
  backend = config.get('backend', 'auto')
  if backend not in ops.BACKENDS:
    raise ValueError(f'model.backend={backend!r}; expected one of '
                     f'{ops.BACKENDS}.')

  def forward(inputs: Any, is_training: bool) -> jax.Array:
    # Implementations are registered per platform while tracing; which one
    # runs is decided when the program is lowered.
    with ops.use_backend(backend):
      return build_model(config)(inputs, is_training=is_training)

  return forward


def make_forward(config: ml_collections.ConfigDict) -> hk.Transformed:
  """hk.transform of `inputs, is_training -> logits` for a model section.

  Raises:
    ValueError: for a model with state (`has_state`); use
      `make_forward_with_state`.
  """
  if has_state(config):
    raise ValueError(
        'This model has Haiku state (BatchNorm moving averages: '
        "preprocessor.conv_norm='batch_norm', or model.type='resnet'); "
        'build it with models.make_forward_with_state(config), whose init '
        'returns (params, state) and apply takes and returns the state.')
  return hk.transform(_forward_fn(config))


def make_forward_with_state(config: ml_collections.ConfigDict
                            ) -> hk.TransformedWithState:
  """hk.transform_with_state of `inputs, is_training -> logits`.

  Works for every model: `init` returns (params, state), `apply(params,
  state, rng, inputs, is_training=...)` returns (logits, new state). The
  state is {} for a stateless model; the params equal make_forward's.
  """
  return hk.transform_with_state(_forward_fn(config))
