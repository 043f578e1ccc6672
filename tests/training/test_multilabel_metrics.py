"""Tests for perceiver_jax.training.multilabel_metrics against scikit-learn."""

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as sk_metrics

from perceiver_jax.training import multilabel_metrics as mm


def _random_problem(seed, n=200, c=12, ties=False):
  rng = np.random.default_rng(seed)
  labels = (rng.random([n, c]) < rng.uniform(0.05, 0.5, size=c)).astype(
      np.float32)
  scores = labels * rng.uniform(0, 1.5, size=c) + rng.normal(size=[n, c])
  if ties:  # Few distinct values: many tied thresholds.
    scores = np.round(scores * 2) / 2
  return labels, scores


@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_per_class_ap_and_auc_match_sklearn(seed, ties):
  labels, scores = _random_problem(seed, ties=ties)
  ap = mm.average_precision(labels, scores)
  auc = mm.roc_auc(labels, scores)
  for k in range(labels.shape[1]):
    np.testing.assert_allclose(
        ap[k], sk_metrics.average_precision_score(labels[:, k], scores[:, k]),
        rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        auc[k], sk_metrics.roc_auc_score(labels[:, k], scores[:, k]),
        rtol=1e-12, atol=1e-12)


def test_all_scores_tied_gives_prevalence_and_half():
  labels = np.array([[1], [0], [0], [1], [0]], np.float32)
  scores = np.zeros_like(labels)
  np.testing.assert_allclose(mm.average_precision(labels, scores), [0.4])
  np.testing.assert_allclose(mm.roc_auc(labels, scores), [0.5])


def test_mean_metrics_and_d_prime():
  labels, scores = _random_problem(3, c=20)
  out = mm.multilabel_metrics(labels, scores)
  expected_map = sk_metrics.average_precision_score(labels, scores,
                                                    average='macro')
  expected_auc = sk_metrics.roc_auc_score(labels, scores, average='macro')
  np.testing.assert_allclose(out['mAP'], expected_map, rtol=1e-12)
  np.testing.assert_allclose(out['AUC'], expected_auc, rtol=1e-12)
  np.testing.assert_allclose(out['d_prime'],
                             np.sqrt(2) * stats.norm.ppf(expected_auc))
  assert out['num_classes_evaluated'] == 20
  assert out['num_classes_excluded'] == 0


def test_d_prime_values():
  assert mm.d_prime(0.5) == 0.0
  np.testing.assert_allclose(mm.d_prime(stats.norm.cdf(1.0)), np.sqrt(2.0))
  with pytest.raises(ValueError, match='auc=1.5'):
    mm.d_prime(1.5)


def test_classes_without_positives_are_excluded_and_counted():
  labels, scores = _random_problem(4, c=6)
  labels[:, 2] = 0  # No positives: no AP, no AUC.
  labels[:, 4] = 1  # No negatives: AP = 1, no AUC.
  out = mm.multilabel_metrics(labels, scores)
  keep_ap = [0, 1, 3, 4, 5]
  keep_auc = [0, 1, 3, 5]
  np.testing.assert_allclose(out['mAP'], sk_metrics.average_precision_score(
      labels[:, keep_ap], scores[:, keep_ap], average='macro'), rtol=1e-12)
  np.testing.assert_allclose(out['AUC'], sk_metrics.roc_auc_score(
      labels[:, keep_auc], scores[:, keep_auc], average='macro'), rtol=1e-12)
  assert out['num_classes_excluded'] == 1
  assert out['num_classes_excluded_auc'] == 2
  assert out['num_classes_evaluated'] == 5


def test_mask_drops_padding_rows():
  labels, scores = _random_problem(5, n=50, c=4)
  padded_labels = np.concatenate([labels, np.ones([6, 4])])
  padded_scores = np.concatenate([scores, np.full([6, 4], -9.0)])
  mask = np.r_[np.ones(50), np.zeros(6)]
  np.testing.assert_allclose(
      mm.multilabel_metrics(padded_labels, padded_scores, mask)['mAP'],
      mm.multilabel_metrics(labels, scores)['mAP'])
  # Unmasked, the padding rows (positives scored lowest) lower the mAP.
  assert (mm.multilabel_metrics(padded_labels, padded_scores)['mAP'] <
          mm.multilabel_metrics(labels, scores)['mAP'])


def test_perfect_and_inverted_scores():
  labels, _ = _random_problem(6, c=5)
  out = mm.multilabel_metrics(labels, labels * 2.0)
  assert out['mAP'] == 1.0 and out['AUC'] == 1.0
  assert mm.multilabel_metrics(labels, -labels)['AUC'] == 0.0


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match=r'\(3, 2\)'):
    mm.multilabel_metrics(np.zeros([3, 2]), np.zeros([3, 3]))
  with pytest.raises(ValueError, match='multi-hot'):
    mm.multilabel_metrics(np.full([3, 2], 0.5), np.zeros([3, 2]))
  with pytest.raises(ValueError, match='non-finite'):
    mm.multilabel_metrics(np.zeros([3, 2]), np.full([3, 2], np.nan))
  with pytest.raises(ValueError, match='No examples'):
    mm.multilabel_metrics(np.zeros([3, 2]), np.zeros([3, 2]), np.zeros([3]))
