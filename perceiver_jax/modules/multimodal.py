"""Multimodal preprocessor: several modalities fused into one byte array.

The contract and shape letters are in `preprocessors`; here M_i, C_i: the
byte array length and channels of modality i.
"""

from typing import Any, Mapping, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from perceiver_jax.modules import preprocessors


class MultimodalPreprocessor(hk.Module):
  """Fuses several modalities into one byte array (P1 AudioSet audio+video).

  Each modality's preprocessor gives [B, M_i, C_i]. All are padded to
  C = max_i C_i + min_padding_size channels with a learned per-modality
  vector (parameter '<modality>_padding' of C - C_i channels, truncated
  normal std 0.02, broadcast over B and M_i), which also tells the encoder
  which modality an input belongs to; then they are concatenated along M in
  sorted modality order. P1 audio+video: video 483 channels +
  min_padding_size 4 -> C = 487; raw audio 257 gets 230 padding channels.

  Modality dropout (training only): per example, modality i's values (its
  preprocessor's output, position features included) are zeroed with
  probability modality_dropout[i] (P1: video, p = 0.3). The learned padding
  stays, so the encoder still sees which modality was dropped. No rescaling
  (unlike unit dropout): the model should see the values it sees at test.

  Mask: None if no modality returned one; else [B, M], the modalities'
  masks concatenated like their values, all True for a modality without one.
  """

  def __init__(self, modalities: Mapping[str, preprocessors.Preprocessor],
               min_padding_size: int = 2,
               modality_dropout: Optional[Mapping[str, float]] = None,
               name: Optional[str] = None):
    """Initialises the module.

    Args:
      modalities: modality name -> preprocessor (called with that entry of
        the input dict).
      min_padding_size: padding channels even the widest modality gets.
      modality_dropout: modality name -> probability in [0, 1] of zeroing
        that modality per training example.
      name: module name.

    Raises:
      ValueError: for no modalities, negative min_padding_size, or dropout
        for an unknown modality or a probability outside [0, 1].
    """
    super().__init__(name=name)
    if not modalities:
      raise ValueError('modalities must name at least one preprocessor.')
    if int(min_padding_size) != min_padding_size or min_padding_size < 0:
      raise ValueError(
          f'min_padding_size must be an integer >= 0, got {min_padding_size}.')
    modality_dropout = dict(modality_dropout or {})
    unknown = sorted(set(modality_dropout) - set(modalities))
    if unknown:
      raise ValueError(f'modality_dropout names unknown modalities {unknown}; '
                       f'modalities are {sorted(modalities)}.')
    for modality, prob in modality_dropout.items():
      if not 0.0 <= prob <= 1.0:
        raise ValueError(f'modality_dropout[{modality!r}] = {prob} is not in '
                         '[0, 1].')
    self._modalities = dict(modalities)
    self._keys = sorted(modalities)
    self._min_padding_size = int(min_padding_size)
    self._modality_dropout = modality_dropout

  def output_shape(
      self, input_shape: Mapping[str, Sequence[int]]) -> tuple[int, int]:
    """(M, C) for per-example inputs {modality: shape}."""
    self._check_keys(input_shape)
    shapes = [self._modalities[k].output_shape(input_shape[k])
              for k in self._keys]
    return (sum(m for m, _ in shapes),
            max(c for _, c in shapes) + self._min_padding_size)

  def _check_keys(self, inputs: Mapping[str, Any]) -> None:
    if not hasattr(inputs, 'keys'):
      raise ValueError('MultimodalPreprocessor expects a dict of inputs keyed '
                       f'by {self._keys}, got {type(inputs).__name__}.')
    missing = sorted(set(self._keys) - set(inputs))
    if missing:
      raise ValueError(f'Inputs lack modalities {missing}; got keys '
                       f'{sorted(inputs)}.')

  def __call__(self, inputs: Mapping[str, Any], *,
               is_training: bool) -> tuple[jax.Array, Optional[jax.Array]]:
    """Maps {modality: raw input} to ([B, M, C], mask [B, M] or None)."""
    self._check_keys(inputs)
    outputs = {k: self._modalities[k](inputs[k], is_training=is_training)
               for k in self._keys}
    batches = {k: x.shape[0] for k, (x, _) in outputs.items()}
    if len(set(batches.values())) != 1:
      raise ValueError(f'Modalities disagree on batch size: {batches}.')
    for k, (x, mask) in outputs.items():
      if x.ndim != 3 or (mask is not None and mask.shape != x.shape[:2]):
        raise ValueError(
            f'Modality {k!r} gave byte array {x.shape} and mask '
            f'{None if mask is None else mask.shape}; expected [B, M, C] '
            'and [B, M] or None.')
    width = (max(x.shape[-1] for x, _ in outputs.values()) +
             self._min_padding_size)

    values, masks = [], []
    for k in self._keys:
      x, mask = outputs[k]  # [B, M_i, C_i], [B, M_i] or None
      batch, length, channels = x.shape
      prob = self._modality_dropout.get(k, 0.0)
      if is_training and prob > 0.0:
        keep = jax.random.bernoulli(hk.next_rng_key(), 1.0 - prob, (batch,))
        x = jnp.where(keep[:, None, None], x, jnp.zeros((), x.dtype))
      if width > channels:
        padding = hk.get_parameter(
            f'{k}_padding', [width - channels],
            init=hk.initializers.TruncatedNormal(stddev=0.02))
        padding = jnp.broadcast_to(padding.astype(x.dtype),
                                   (batch, length, width - channels))
        x = jnp.concatenate([x, padding], axis=-1)  # [B, M_i, C]
      values.append(x)
      masks.append(mask)

    x = jnp.concatenate(values, axis=1)  # [B, M, C]
    if all(m is None for m in masks):
      return x, None
    mask = jnp.concatenate(
        [jnp.ones(v.shape[:2], bool) if m is None else m.astype(bool)
         for v, m in zip(values, masks)], axis=1)  # [B, M]
    return x, mask
