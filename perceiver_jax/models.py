"""Builds a Perceiver from the `model` section of a config.

The section has three parts, each a ConfigDict whose fields are the
constructor arguments of the chosen class:
  preprocessor: `type` in PREPROCESSORS (+ `permutation_seed`, see below);
    for `type='multimodal'`, `modalities` maps names to such sections.
  encoder: PerceiverEncoder arguments (num_latents, latent_dim, ...).
  decoder: `type` in DECODERS ('average' = P1, 'query' = P2 classifier).

A preprocessor's `permutation_seed` (int or None) applies one fixed
permutation of the M inputs after position features are attached: permuted
ImageNet (P1 Sec. 4.2, Tab. 2).
"""

from typing import Any, Callable, Mapping, Optional

import haiku as hk
import jax
import ml_collections

from perceiver_jax.modules import perceiver
from perceiver_jax.modules import preprocessors

PREPROCESSORS: Mapping[str, Callable[..., Any]] = {
    'image': preprocessors.ImagePreprocessor,
    'audio': preprocessors.AudioPreprocessor,
    'spectrogram': preprocessors.SpectrogramPreprocessor,
    'video': preprocessors.VideoPreprocessor,
    'point_cloud': preprocessors.PointCloudPreprocessor,
}

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
    x = x[:, perm]  # [B, M, C]
    if mask is not None:
      mask = mask[:, perm]
    return x, mask


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
                       name: Optional[str] = None):
  """Returns the preprocessor module a config section describes."""
  kind = section.type
  if kind == 'multimodal':
    modalities = {
        modality: build_preprocessor(sub, name=f'{modality}_preprocessor')
        for modality, sub in section.modalities.items()}
    module = preprocessors.MultimodalPreprocessor(
        modalities, name=name,
        **_kwargs(section, 'type', 'modalities', 'permutation_seed'))
  else:
    cls = _lookup(PREPROCESSORS, kind, 'preprocessor')
    module = cls(name=name, **_kwargs(section, 'type', 'permutation_seed'))
  seed = section.get('permutation_seed')
  if seed is not None:
    module = PermutedPreprocessor(module, seed, name='permutation')
  return module


def build_model(config: ml_collections.ConfigDict) -> perceiver.Perceiver:
  """Returns the Perceiver of `config` (the model section); call in hk."""
  decoder_cls = _lookup(DECODERS, config.decoder.type, 'decoder')
  return perceiver.Perceiver(
      preprocessor=build_preprocessor(config.preprocessor,
                                      name='preprocessor'),
      encoder=perceiver.PerceiverEncoder(
          name='encoder', **_kwargs(config.encoder)),
      decoder=decoder_cls(name='decoder', **_kwargs(config.decoder, 'type')),
      name='perceiver')


def make_forward(config: ml_collections.ConfigDict) -> hk.Transformed:
  """hk.transform of `inputs, is_training -> logits` for a model section."""

  def forward(inputs: Any, is_training: bool) -> jax.Array:
    return build_model(config)(inputs, is_training=is_training)

  return hk.transform(forward)
