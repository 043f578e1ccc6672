"""Single-label classification metrics.

Shapes: B examples, K classes.

- `topk_correct` (JAX, inside the pmapped step): 1.0 where the label is among
  the k highest logits. Ties are broken towards the lower class index, as
  `jnp.argmax` does, so top-1 agrees with argmax predictions (and constant
  logits do not count as correct for every class).
- Confusion-matrix helpers (NumPy, on the host): an evaluation sums
  int64 [K_true, K_pred] counts over batches (and devices), then reports
  overall accuracy, per-class accuracy (recall of each true class) and the
  mean class accuracy that ModelNet40 papers report beside overall accuracy.
  A class without any example has no accuracy: `per_class_accuracy` gives
  NaN for it and `mean_class_accuracy` leaves it out of the mean.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Whether each label is among the top k logits.

  Args:
    logits: [B, K] scores.
    labels: int [B] class indices.
    k: 1 <= k <= K.

  Returns:
    float32 [B]: 1.0 when labels[b] is one of the k largest logits[b].

  Raises:
    ValueError: for bad shapes or k outside [1, K].
  """
  if logits.ndim != 2:
    raise ValueError(f'logits must be [B, K], got shape {logits.shape}.')
  if labels.shape != logits.shape[:1]:
    raise ValueError(f'labels {labels.shape} do not match logits '
                     f'{logits.shape}: expected [{logits.shape[0]}].')
  if not 1 <= k <= logits.shape[1]:
    raise ValueError(f'k must be in [1, K={logits.shape[1]}], got {k}.')
  _, top = jax.lax.top_k(logits, k)  # [B, k], ties -> lower index first.
  hit = jnp.any(top == labels[:, None].astype(top.dtype), axis=-1)
  return hit.astype(jnp.float32)


def confusion_matrix(preds: np.ndarray, labels: np.ndarray, num_classes: int,
                     mask: Optional[np.ndarray] = None) -> np.ndarray:
  """Counts of (true class, predicted class) pairs.

  Args:
    preds: int [B] predicted classes.
    labels: int [B] true classes.
    num_classes: K.
    mask: optional [B]; examples where it is 0/False (padding) are skipped.

  Returns:
    int64 [K, K]; entry [i, j] counts examples of class i predicted as j.
    Confusion matrices of several batches add up.

  Raises:
    ValueError: for mismatched shapes or classes outside [0, K).
  """
  preds = np.asarray(preds)
  labels = np.asarray(labels)
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}.')
  if preds.ndim != 1 or preds.shape != labels.shape:
    raise ValueError(f'preds {preds.shape} and labels {labels.shape} must '
                     'both be [B].')
  if mask is not None:
    mask = np.asarray(mask)
    if mask.shape != labels.shape:
      raise ValueError(f'mask {mask.shape} does not match labels '
                       f'{labels.shape}.')
    keep = mask.astype(bool)
    preds, labels = preds[keep], labels[keep]
  for name, values in (('preds', preds), ('labels', labels)):
    if values.size and (values.min() < 0 or values.max() >= num_classes):
      raise ValueError(f'{name} must be in [0, {num_classes}), got values in '
                       f'[{values.min()}, {values.max()}].')
  flat = labels.astype(np.int64) * num_classes + preds.astype(np.int64)
  counts = np.bincount(flat, minlength=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(np.int64)


def _check_confusion(confusion: np.ndarray) -> np.ndarray:
  confusion = np.asarray(confusion)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f'confusion must be [K, K], got shape {confusion.shape}.')
  if np.any(confusion < 0):
    raise ValueError('confusion has negative counts.')
  return confusion


def accuracy(confusion: np.ndarray) -> float:
  """Overall accuracy: correct / all examples.

  Raises:
    ValueError: for a non-square or empty confusion matrix.
  """
  confusion = _check_confusion(confusion)
  total = confusion.sum()
  if total == 0:
    raise ValueError('confusion holds no examples.')
  return float(np.trace(confusion) / total)


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
  """Accuracy of each true class (row): diagonal / row sum.

  Args:
    confusion: [K_true, K_pred] counts, as from `confusion_matrix`.

  Returns:
    float64 [K]; NaN for a class with no example.

  Raises:
    ValueError: for a non-square matrix or negative counts.
  """
  confusion = _check_confusion(confusion).astype(np.float64)
  support = confusion.sum(axis=1)
  correct = np.diagonal(confusion)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(support > 0, correct / support, np.nan)


def mean_class_accuracy(confusion: np.ndarray) -> float:
  """Mean of `per_class_accuracy` over the classes that have examples.

  Raises:
    ValueError: for a bad matrix or one that holds no example at all.
  """
  per_class = per_class_accuracy(confusion)
  present = np.isfinite(per_class)
  if not present.any():
    raise ValueError('confusion holds no examples.')
  return float(per_class[present].mean())
