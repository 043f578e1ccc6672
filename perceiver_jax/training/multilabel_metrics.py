"""Multi-label evaluation metrics (AudioSet): mAP, mean ROC AUC and d-prime.

NumPy, computed once per evaluation over the whole split on the host.

Shapes: N examples, C classes. `labels` [N, C] in {0, 1}; `scores` [N, C]
any monotone score (logits or probabilities; both give the same values).

- AP per class equals sklearn.metrics.average_precision_score on that
  column: sum over distinct score thresholds of (R_k - R_{k-1}) * P_k, ties
  grouped into one threshold. mAP averages AP over classes, i.e. per class
  and then across classes (P1 v1 computed it transposed; P1 v2 corrected it).
- AUC per class equals sklearn.metrics.roc_auc_score: trapezoidal area under
  the ROC curve over distinct thresholds (a tied positive/negative pair
  counts one half).
- d' = sqrt(2) * Phi^{-1}(mean AUC), as reported for AudioSet.

A class with no positive example has no AP or AUC: it is excluded from the
means and counted ('num_classes_excluded') so the caller can log it; a class
with no negative example has an AP but no AUC ('num_classes_excluded_auc').
"""

from typing import Optional

import numpy as np
from scipy import stats


def _threshold_curve(labels: np.ndarray, scores: np.ndarray):
  """Cumulative counts at each distinct threshold, per class.

  Sorting each column by decreasing score, row i of the outputs describes the
  threshold "score >= sorted[i]"; it is a real threshold only where
  `is_end` (the last row of a run of tied scores).

  Returns:
    tps, fps: float64 [N, C] true/false positives predicted at row i.
    prev_tps, prev_fps: [N, C] the same at the previous real threshold (0
      before the first).
    is_end: bool [N, C].
  """
  order = np.argsort(-scores, axis=0, kind='stable')
  s = np.take_along_axis(scores, order, axis=0)
  y = np.take_along_axis(labels, order, axis=0)
  tps = np.cumsum(y, axis=0)
  fps = np.cumsum(1.0 - y, axis=0)
  is_end = np.ones_like(s, bool)
  is_end[:-1] = s[:-1] != s[1:]
  # Counts only grow down a column, so the previous end's count is the
  # running max of end counts, shifted down one row.
  def previous(counts):
    at_ends = np.where(is_end, counts, 0.0)
    prev = np.maximum.accumulate(at_ends, axis=0)
    return np.concatenate([np.zeros_like(prev[:1]), prev[:-1]], axis=0)
  return tps, fps, previous(tps), previous(fps), is_end


def _check(labels, scores, mask):
  labels = np.asarray(labels, np.float64)
  scores = np.asarray(scores, np.float64)
  if labels.ndim != 2 or labels.shape != scores.shape:
    raise ValueError(f'labels {labels.shape} and scores {scores.shape} must '
                     'both be [num_examples, num_classes].')
  if not np.all((labels == 0) | (labels == 1)):
    raise ValueError('labels must be multi-hot (0 or 1).')
  if not np.all(np.isfinite(scores)):
    raise ValueError(f'scores hold {np.sum(~np.isfinite(scores))} non-finite '
                     'values.')
  if mask is not None:
    mask = np.asarray(mask)
    if mask.shape != labels.shape[:1]:
      raise ValueError(f'mask {mask.shape} must be [{labels.shape[0]}].')
    keep = mask > 0
    labels, scores = labels[keep], scores[keep]
  if not len(labels):
    raise ValueError('No examples to evaluate.')
  return labels, scores


def average_precision(labels: np.ndarray, scores: np.ndarray,
                      mask: Optional[np.ndarray] = None) -> np.ndarray:
  """Per-class average precision, float64 [C]; NaN for classes without
  positives.

  Args:
    labels: [N, C] multi-hot.
    scores: [N, C] finite scores.
    mask: optional [N]; rows with mask 0 (padding) are ignored.
  """
  labels, scores = _check(labels, scores, mask)
  tps, _, prev_tps, _, is_end = _threshold_curve(labels, scores)
  num_pos = labels.sum(axis=0)
  precision = tps / np.arange(1, len(tps) + 1)[:, None]
  gain = np.where(is_end, (tps - prev_tps) * precision, 0.0).sum(axis=0)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(num_pos > 0, gain / num_pos, np.nan)


def roc_auc(labels: np.ndarray, scores: np.ndarray,
            mask: Optional[np.ndarray] = None) -> np.ndarray:
  """Per-class ROC AUC, float64 [C]; NaN for classes lacking positives or
  negatives. Arguments as `average_precision`."""
  labels, scores = _check(labels, scores, mask)
  tps, fps, prev_tps, prev_fps, is_end = _threshold_curve(labels, scores)
  area = np.where(is_end, (fps - prev_fps) * (tps + prev_tps) / 2.0,
                  0.0).sum(axis=0)
  num_pos = labels.sum(axis=0)
  num_neg = len(labels) - num_pos
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where((num_pos > 0) & (num_neg > 0),
                    area / (num_pos * num_neg), np.nan)


def d_prime(auc: float) -> float:
  """Sensitivity index d' = sqrt(2) * Phi^{-1}(auc)."""
  if not 0.0 <= auc <= 1.0:
    raise ValueError(f'auc={auc} not in [0, 1].')
  return float(np.sqrt(2.0) * stats.norm.ppf(auc))


def multilabel_metrics(labels: np.ndarray, scores: np.ndarray,
                       mask: Optional[np.ndarray] = None) -> dict[str, float]:
  """mAP, mean AUC and d' over the classes that can be scored.

  Args:
    labels: [N, C] multi-hot.
    scores: [N, C] finite scores (e.g. window-averaged logits).
    mask: optional [N]; rows with mask 0 (padding) are ignored.

  Returns:
    {'mAP', 'AUC', 'd_prime', 'num_classes_evaluated',
    'num_classes_excluded' (no positives; left out of mAP and AUC),
    'num_classes_excluded_auc' (no positives or no negatives)}.
    Means are NaN if no class can be scored.

  Raises:
    ValueError: on mismatched shapes, non-binary labels, non-finite scores,
      or no unmasked example.
  """
  ap = average_precision(labels, scores, mask)
  auc = roc_auc(labels, scores, mask)
  scored_ap, scored_auc = ~np.isnan(ap), ~np.isnan(auc)
  mean_ap = float(ap[scored_ap].mean()) if scored_ap.any() else float('nan')
  mean_auc = float(auc[scored_auc].mean()) if scored_auc.any() else float(
      'nan')
  return {
      'mAP': mean_ap,
      'AUC': mean_auc,
      'd_prime': d_prime(mean_auc) if scored_auc.any() else float('nan'),
      'num_classes_evaluated': int(scored_ap.sum()),
      'num_classes_excluded': int((~scored_ap).sum()),
      'num_classes_excluded_auc': int((~scored_auc).sum()),
  }
