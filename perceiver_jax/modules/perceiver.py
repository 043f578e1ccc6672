"""The Perceiver encoder (P1), Perceiver IO encoder/decoders (P2), and model.

Shape letters:
  B: batch size.  M: byte array length.  C: byte array channels.
  N: num_latents.  D: latent_dim.  O: number of output queries.
  E: output query channels.  K: number of classes / output channels.

Encoder schedule: the latent Transformer (num_self_attends_per_block blocks)
runs num_blocks times; cross-attend i precedes run i for i < num_cross_attends.
  P1 ImageNet: num_cross_attends = num_blocks = 8, 6 blocks each.
  P2 encoder:  num_cross_attends = 1, num_blocks = 8.

Weight sharing (P1 Sec. 2 "an RNN unrolled in depth"), as explicit options:
  share_cross_attends: cross_attend_0 has its own weights, cross-attends
    1..T-1 share one set named cross_attend_1; else each has its own.
  share_latent_transformer: one latent_transformer used by all num_blocks
    runs; else latent_transformer_0 .. latent_transformer_{num_blocks-1}.

Cost (see attention.py): cross-attends that share weights also share their
normalised input and its projections, computed once; `cross_attention`
picks the exact cross-attention formulation ('auto': the cheaper one) and
`cross_attention_chunk_size` bounds the logits held at once
(`reuse_shared_inputs=False` and 'direct' give the paper's formulation and
FLOP count); `remat`
recomputes each block's activations in the backward pass (less memory).
"""

from typing import Any, Callable, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from perceiver_jax.modules import attention
from perceiver_jax.modules import position_encoding


class LatentTransformer(hk.Module):
  """num_self_attends_per_block self-attention blocks, latent_block_0..L-1."""

  def __init__(self, num_self_attends_per_block: int, num_heads: int = 8,
               qk_channels: Optional[int] = None,
               v_channels: Optional[int] = None, widening_factor: int = 1,
               dropout_prob: float = 0.0, name: Optional[str] = None):
    super().__init__(name=name)
    self._blocks = [
        attention.SelfAttention(
            num_heads=num_heads, qk_channels=qk_channels,
            v_channels=v_channels, widening_factor=widening_factor,
            dropout_prob=dropout_prob, name=f'latent_block_{i}')
        for i in range(num_self_attends_per_block)]

  def __call__(self, z: jax.Array, *, is_training: bool) -> jax.Array:
    """Maps latents [B, N, D] -> [B, N, D]."""
    for block in self._blocks:
      z = block(z, is_training=is_training)
    return z


class PerceiverEncoder(hk.Module):
  """Cross-attends from a learned latent array to the byte array."""

  def __init__(self, num_latents: int = 512, latent_dim: int = 1024,
               num_cross_attends: int = 8, num_self_attends_per_block: int = 6,
               num_blocks: Optional[int] = None, num_cross_heads: int = 1,
               num_self_heads: int = 8,
               cross_qk_channels: Optional[int] = None,
               cross_v_channels: Optional[int] = None,
               self_qk_channels: Optional[int] = None,
               self_v_channels: Optional[int] = None,
               cross_widening_factor: int = 1, self_widening_factor: int = 1,
               share_cross_attends: bool = True,
               share_latent_transformer: bool = True,
               use_query_residual: bool = True, dropout_prob: float = 0.0,
               latent_init_scale: float = 0.02,
               cross_attention: str = 'auto',
               cross_attention_chunk_size: Optional[int] = None,
               reuse_shared_inputs: bool = True,
               remat: bool = False, name: Optional[str] = None):
    super().__init__(name=name)
    num_blocks = num_cross_attends if num_blocks is None else num_blocks
    for what, value in (('num_latents', num_latents),
                        ('latent_dim', latent_dim),
                        ('num_cross_attends', num_cross_attends),
                        ('num_self_attends_per_block',
                         num_self_attends_per_block)):
      if value < 1:
        raise ValueError(f'{what} must be >= 1, got {value}.')
    if num_blocks < num_cross_attends:
      raise ValueError(
          f'num_blocks={num_blocks} < num_cross_attends={num_cross_attends}: '
          'every cross-attend must be followed by a latent Transformer.')
    if latent_dim % num_self_heads:
      raise ValueError(f'latent_dim={latent_dim} is not divisible by '
                       f'num_self_heads={num_self_heads}.')
    if cross_qk_channels and cross_qk_channels % num_cross_heads:
      raise ValueError(f'cross_qk_channels={cross_qk_channels} is not '
                       f'divisible by num_cross_heads={num_cross_heads}.')
    self.num_latents = num_latents
    self.latent_dim = latent_dim
    self._num_cross_attends = num_cross_attends
    self._num_blocks = num_blocks
    self._latent_init_scale = latent_init_scale
    self._num_cross_heads = num_cross_heads
    self._remat = remat
    self._reuse_shared_inputs = reuse_shared_inputs
    if cross_attention not in attention.FORMULATIONS:
      raise ValueError(f'cross_attention must be one of '
                       f'{attention.FORMULATIONS}, got {cross_attention!r}.')
    shared_cross = share_cross_attends and num_cross_attends > 1

    def cross_attend(i):
      return attention.CrossAttention(
          num_heads=num_cross_heads, qk_channels=cross_qk_channels,
          v_channels=cross_v_channels, widening_factor=cross_widening_factor,
          dropout_prob=dropout_prob, use_query_residual=use_query_residual,
          formulation=cross_attention,
          chunk_size=cross_attention_chunk_size,
          num_uses=(num_cross_attends - 1 if shared_cross and i == 1 and
                    reuse_shared_inputs else 1),
          name=f'cross_attend_{i}')

    def latent_transformer(name):
      return LatentTransformer(
          num_self_attends_per_block, num_heads=num_self_heads,
          qk_channels=self_qk_channels, v_channels=self_v_channels,
          widening_factor=self_widening_factor, dropout_prob=dropout_prob,
          name=name)

    if shared_cross:
      shared = cross_attend(1)
      self._cross_attends = [cross_attend(0)] + [shared] * (
          num_cross_attends - 1)
    else:
      self._cross_attends = [cross_attend(i) for i in range(num_cross_attends)]
    if share_latent_transformer:
      self._latent_transformers = [latent_transformer('latent_transformer')
                                   ] * num_blocks
    else:
      self._latent_transformers = [
          latent_transformer(f'latent_transformer_{i}')
          for i in range(num_blocks)]

  def __call__(self, inputs: jax.Array, *, is_training: bool,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """Encodes a byte array [B, M, C] (mask [B, M]) into latents [B, N, D]."""
    if inputs.ndim != 3:
      raise ValueError(f'inputs must be [B, M, C], got shape {inputs.shape}.')
    if self._num_cross_heads > 1 and inputs.shape[-1] % self._num_cross_heads:
      raise ValueError(
          f'Byte array channels C={inputs.shape[-1]} not divisible by '
          f'num_cross_heads={self._num_cross_heads}; set cross_qk_channels.')
    latents = hk.get_parameter(
        'latents', [self.num_latents, self.latent_dim], inputs.dtype,
        init=hk.initializers.TruncatedNormal(self._latent_init_scale))
    z = jnp.broadcast_to(latents, (inputs.shape[0],) + latents.shape)
    prepared = {}  # One LN(inputs) (+ projections) per distinct cross-attend.
    for i in range(self._num_blocks):
      if i < self._num_cross_attends:
        cross_attend = self._cross_attends[i]
        if id(cross_attend) not in prepared or not self._reuse_shared_inputs:
          prepared[id(cross_attend)] = cross_attend.prepare(
              inputs, self.num_latents)
        z = self._maybe_remat(
            lambda z, ca=cross_attend, p=prepared[id(cross_attend)]: ca(
                z, is_training=is_training, mask=mask, prepared=p))(z)
      z = self._maybe_remat(lambda z, lt=self._latent_transformers[i]: lt(
          z, is_training=is_training))(z)
    return z

  def _maybe_remat(self, fn):
    return hk.remat(fn) if self._remat else fn


class AverageDecoder(hk.Module):
  """P1's output: average the latents over N, then one Linear to K classes."""

  def __init__(self, num_classes: int, name: Optional[str] = None):
    super().__init__(name=name)
    if num_classes < 1:
      raise ValueError(f'num_classes must be >= 1, got {num_classes}.')
    self._num_classes = num_classes

  def __call__(self, z: jax.Array, *, is_training: bool) -> jax.Array:
    """Maps latents [B, N, D] -> logits [B, K]."""
    del is_training
    return hk.Linear(self._num_classes, w_init=attention.linear_init(),
                     name='logits')(jnp.mean(z, axis=1))


class BasicQueryDecoder(hk.Module):
  """Cross-attends from an output query array to the latents (P2).

  Queries are learned ([O, E], truncated normal) or Fourier features of the
  output positions (O = prod(output_index_dims)). The attended queries are
  projected to K output channels: [B, N, D] -> [B, O, K].
  """

  def __init__(self, output_channels: int, output_index_dims: tuple[int, ...],
               query_type: str = 'learned', query_channels: int = 1024,
               num_freq_bands: int = 64,
               max_resolution: Optional[tuple[int, ...]] = None,
               num_heads: int = 1, qk_channels: Optional[int] = None,
               v_channels: Optional[int] = None, widening_factor: int = 1,
               use_query_residual: bool = True, dropout_prob: float = 0.0,
               query_init_scale: float = 0.02, name: Optional[str] = None):
    super().__init__(name=name)
    if query_type not in ('learned', 'fourier'):
      raise ValueError(
          f"query_type must be 'learned' or 'fourier', got {query_type!r}.")
    self._output_channels = output_channels
    self._index_dims = tuple(output_index_dims)
    self._query_type = query_type
    self._query_channels = query_channels
    self._num_freq_bands = num_freq_bands
    self._max_resolution = max_resolution or self._index_dims
    self._query_init_scale = query_init_scale
    # P2's decoder: qk width defaults to the query width (the code's default).
    self._cross_attend = attention.CrossAttention(
        num_heads=num_heads,
        qk_channels=qk_channels or (
            query_channels if query_type == 'learned' else None),
        v_channels=v_channels, widening_factor=widening_factor,
        dropout_prob=dropout_prob, use_query_residual=use_query_residual,
        name='cross_attend')

  def queries(self, batch_size: int, dtype: Any = jnp.float32) -> jax.Array:
    """The output query array [B, O, E]."""
    num_queries = int(np.prod(self._index_dims))
    if self._query_type == 'learned':
      q = hk.get_parameter(
          'queries', [num_queries, self._query_channels], dtype,
          init=hk.initializers.TruncatedNormal(self._query_init_scale))
    else:
      positions = position_encoding.build_linear_positions(self._index_dims)
      q = position_encoding.fourier_features(
          positions.reshape(num_queries, -1), self._num_freq_bands,
          self._max_resolution)
      q = jnp.asarray(q, dtype)
    return jnp.broadcast_to(q, (batch_size,) + q.shape)

  def __call__(self, z: jax.Array, *, is_training: bool) -> jax.Array:
    """Maps latents [B, N, D] -> outputs [B, O, K]."""
    q = self.queries(z.shape[0], z.dtype)
    out = self._cross_attend(q, z, is_training=is_training)  # [B, O, E]
    return hk.Linear(self._output_channels, w_init=attention.linear_init(),
                     name='output')(out)


class ClassificationQueryDecoder(hk.Module):
  """P2's classifier: one learned query of width E attends to the latents."""

  def __init__(self, num_classes: int, query_channels: int = 1024,
               num_heads: int = 1, widening_factor: int = 1,
               use_query_residual: bool = True, dropout_prob: float = 0.0,
               name: Optional[str] = None):
    super().__init__(name=name)
    if num_classes < 1:
      raise ValueError(f'num_classes must be >= 1, got {num_classes}.')
    self._decoder = BasicQueryDecoder(
        output_channels=num_classes, output_index_dims=(1,),
        query_type='learned', query_channels=query_channels,
        num_heads=num_heads, widening_factor=widening_factor,
        use_query_residual=use_query_residual, dropout_prob=dropout_prob,
        name='query_decoder')

  def __call__(self, z: jax.Array, *, is_training: bool) -> jax.Array:
    """Maps latents [B, N, D] -> logits [B, K]."""
    return self._decoder(z, is_training=is_training)[:, 0]


class Perceiver(hk.Module):
  """preprocessor -> encoder -> decoder.

  The preprocessor maps raw inputs to (byte array [B, M, C], mask [B, M] or
  None); the decoder maps latents [B, N, D] to outputs, e.g. logits [B, K].
  """

  def __init__(self, preprocessor: Callable[..., Any],
               encoder: PerceiverEncoder, decoder: Callable[..., jax.Array],
               name: Optional[str] = None):
    super().__init__(name=name)
    self._preprocessor = preprocessor
    self._encoder = encoder
    self._decoder = decoder

  def __call__(self, inputs: Any, *, is_training: bool) -> jax.Array:
    byte_array, mask = self._preprocessor(inputs, is_training=is_training)
    z = self._encoder(byte_array, is_training=is_training, mask=mask)
    return self._decoder(z, is_training=is_training)
