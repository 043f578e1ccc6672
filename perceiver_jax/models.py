"""Builds a Perceiver from the `model` section of a config.

The section has three parts, each a ConfigDict whose fields are the
constructor arguments of the chosen class:
  preprocessor: `type` in PREPROCESSORS (+ `permutation_seed`, see below);
    for `type='multimodal'`, `modalities` maps names to such sections.
  encoder: PerceiverEncoder arguments (num_latents, latent_dim, ...).
  decoder: `type` in DECODERS ('average' = P1, 'query' = P2 classifier).
and two fields of their own (neither changes results beyond float32
rounding; neither has an effect off CPU):
  cpu_matmul: 'auto' (default), 'blas' or 'xla': how matrix products that
    XLA:CPU runs slowly are computed (perceiver_jax.kernels.cpu_matmul).
  fused_cpu_attention: True (default): unmasked float32 attention runs as
    one fused kernel per pass (perceiver_jax.kernels.cpu_attention) where
    cpu_matmul allows OpenBLAS; False: as separate products and softmax.

A preprocessor's `permutation_seed` (int or None) applies one fixed
permutation of the M inputs after position features are attached: permuted
ImageNet (P1 Sec. 4.2, Tab. 2). Its `input_key` (optional) picks one entry
of dict-valued inputs (e.g. 'audio' of an AudioSet batch). The model's own
preprocessor keeps Fourier position features apart from the per-example
channels where it can (`byte_array`): same outputs, less memory.
"""

from typing import Any, Callable, Mapping, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections

from perceiver_jax.kernels import cpu_attention
from perceiver_jax.kernels import cpu_matmul
from perceiver_jax.modules import byte_array
from perceiver_jax.modules import perceiver
from perceiver_jax.modules import preprocessors

PREPROCESSORS: Mapping[str, Callable[..., Any]] = {
    'image': preprocessors.ImagePreprocessor,
    'audio': preprocessors.AudioPreprocessor,
    'spectrogram': preprocessors.SpectrogramPreprocessor,
    'video': preprocessors.VideoPreprocessor,
    'point_cloud': preprocessors.PointCloudPreprocessor,
}
# Those that can keep Fourier position features apart from the per-example
# channels (`byte_array.SplitByteArray`); build_model asks them to.
SPLITS_POSITIONS = ('image', 'audio', 'spectrogram', 'video')

DECODERS: Mapping[str, Callable[..., Any]] = {
    'average': perceiver.AverageDecoder,
    'query': perceiver.ClassificationQueryDecoder,
}


class PermutedPreprocessor(hk.Module):
  """Applies one fixed permutation to a preprocessor's [B, M, C] output.

  The permutation of the M positions is drawn from `seed` when the input
  size is first seen, so it is the same on every host, run and split.
  """

  def __init__(self, preprocessor: Callable[..., Any], seed: int,
               name: Optional[str] = None):
    super().__init__(name=name)
    self._preprocessor = preprocessor
    self._seed = seed

  def __call__(self, inputs: Any, *, is_training: bool):
    x, mask = self._preprocessor(inputs, is_training=is_training)
    perm = preprocessors.make_permutation(x.shape[1], self._seed)
    x = byte_array.take(x, perm)  # [B, M, C]
    if mask is not None:
      mask = mask[:, perm]
    return x, mask


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
      byte arrays with Fourier features as `byte_array.SplitByteArray`.
  """
  kind = section.type
  if kind == 'multimodal':
    modalities = {
        modality: build_preprocessor(sub, name=f'{modality}_preprocessor',
                                     select_input=False)
        for modality, sub in section.modalities.items()}
    module = preprocessors.MultimodalPreprocessor(
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
    module = PermutedPreprocessor(module, seed, name='permutation')
  return module


def build_model(config: ml_collections.ConfigDict) -> perceiver.Perceiver:
  """Returns the Perceiver of `config` (the model section); call in hk."""
  decoder_cls = _lookup(DECODERS, config.decoder.type, 'decoder')
  return perceiver.Perceiver(
      preprocessor=build_preprocessor(config.preprocessor,
                                      name='preprocessor',
                                      split_positions=True),
      encoder=perceiver.PerceiverEncoder(
          name='encoder', **_kwargs(config.encoder)),
      decoder=decoder_cls(name='decoder', **_kwargs(config.decoder, 'type')),
      name='perceiver')


def make_forward(config: ml_collections.ConfigDict) -> hk.Transformed:
  """hk.transform of `inputs, is_training -> logits` for a model section."""
  matmul_backend = config.get('cpu_matmul', 'auto')
  if matmul_backend not in cpu_matmul.BACKENDS:
    raise ValueError(f'model.cpu_matmul={matmul_backend!r}; expected one of '
                     f'{cpu_matmul.BACKENDS}.')

  fused_attention = config.get('fused_cpu_attention', True)
  if not isinstance(fused_attention, bool):
    raise ValueError(f'model.fused_cpu_attention={fused_attention!r}; '
                     'expected True or False.')

  def forward(inputs: Any, is_training: bool) -> jax.Array:
    # The kernels are chosen while tracing, so the contexts wrap the trace.
    with cpu_matmul.backend(matmul_backend), cpu_attention.fused(
        fused_attention):
      return build_model(config)(inputs, is_training=is_training)

  return hk.transform(forward)
