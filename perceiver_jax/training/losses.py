"""Classification losses, per example so that the caller can mask padding.

Shapes: B examples, K classes. Every loss returns float32 [B] whatever the
logits' dtype (bf16 logits are upcast first: log-sum-exp in bf16 loses the
small probabilities). Reduce with `masked_mean`, whose mask is the loaders'
batch['mask'] (1 for real examples, 0 for padding).

- `softmax_cross_entropy`: single-label (ImageNet, ModelNet40). Labels are
  class indices [B] or probability rows [B, K] (MixUp / CutMix soft labels).
  Label smoothing as in Szegedy et al. 2016: targets (1 - eps) * y + eps / K.
- `sigmoid_cross_entropy`: multi-label (AudioSet). The per-example loss is
  the MEAN over the K classes of the binary cross-entropy (as Keras'
  binary_crossentropy and PyTorch's BCEWithLogitsLoss): its scale does not
  grow with K, so learning rates and the gradient-clipping threshold carry
  over between label sets (527 AudioSet classes vs 10 on a toy set).
"""

import jax
import jax.numpy as jnp
import optax


def _check_logits(logits: jax.Array) -> None:
  if logits.ndim != 2:
    raise ValueError(f'logits must be [B, K], got shape {logits.shape}.')


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, *,
                          label_smoothing: float = 0.0) -> jax.Array:
  """Softmax cross-entropy of each example.

  Args:
    logits: [B, K] unnormalised log-probabilities.
    labels: int [B] class indices in [0, K), or float [B, K] target
      probabilities (rows summing to 1). An index outside [0, K) cannot be
      checked under jit; it gives an all-zero target row and a zero loss.
    label_smoothing: eps in [0, 1]; targets become (1 - eps) * y + eps / K.

  Returns:
    float32 [B] losses.

  Raises:
    ValueError: for mismatched shapes, a wrong label dtype or eps outside
      [0, 1].
  """
  _check_logits(logits)
  if not 0.0 <= label_smoothing <= 1.0:
    raise ValueError(
        f'label_smoothing must be in [0, 1], got {label_smoothing}.')
  batch, num_classes = logits.shape
  labels = jnp.asarray(labels)
  if labels.ndim == 1:
    if labels.shape[0] != batch:
      raise ValueError(f'labels {labels.shape} do not match logits '
                       f'{logits.shape}: expected [{batch}].')
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f'Index labels [B] must be integers, got dtype '
                       f'{labels.dtype}; pass probabilities as [B, K].')
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  elif labels.ndim == 2:
    if labels.shape != logits.shape:
      raise ValueError(f'Probability labels {labels.shape} do not match '
                       f'logits {logits.shape}.')
    if not jnp.issubdtype(labels.dtype, jnp.floating):
      raise ValueError(f'Probability labels [B, K] must be floats, got '
                       f'dtype {labels.dtype}.')
    targets = labels.astype(jnp.float32)
  else:
    raise ValueError(f'labels must be [B] or [B, K], got shape '
                     f'{labels.shape}.')
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Binary cross-entropy of each class, averaged over the K classes.

  Computed from logits (log-sigmoid), so it stays finite for large |logits|.

  Args:
    logits: [B, K] one independent logit per class.
    labels: [B, K] multi-hot targets in [0, 1] (soft targets allowed).

  Returns:
    float32 [B] losses.

  Raises:
    ValueError: when the shapes differ or logits are not [B, K].
  """
  _check_logits(logits)
  labels = jnp.asarray(labels)
  if labels.shape != logits.shape:
    raise ValueError(f'labels {labels.shape} do not match logits '
                     f'{logits.shape}: expected multi-hot [B, K].')
  per_class = optax.sigmoid_binary_cross_entropy(
      logits.astype(jnp.float32), labels.astype(jnp.float32))  # [B, K]
  return jnp.mean(per_class, axis=-1)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of values [B] over the examples where mask [B] is non-zero.

  A non-binary mask acts as per-example weights. Masked-out values never
  reach the result, even NaN ones (padding may hold anything).

  Args:
    values: [B] per-example values.
    mask: [B] bool or {0, 1} (or non-negative weights).

  Returns:
    float32 scalar: sum(mask * values) / sum(mask), or 0 when the mask is
    empty.

  Raises:
    ValueError: when the shapes differ.
  """
  values = jnp.asarray(values)
  mask = jnp.asarray(mask)
  if values.shape != mask.shape or values.ndim != 1:
    raise ValueError(f'values {values.shape} and mask {mask.shape} must both '
                     'be [B].')
  weights = mask.astype(jnp.float32)
  kept = jnp.where(weights > 0, values.astype(jnp.float32), 0.0)
  total = jnp.sum(kept * weights)
  count = jnp.sum(weights)
  return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)
