"""Tests for perceiver_jax.training.metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax.training import metrics


def test_topk_correct_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=[32, 10]).astype(np.float32)
  labels = rng.integers(0, 10, size=[32]).astype(np.int32)
  # Rank of the label = number of classes with a strictly larger logit.
  rank = (logits > logits[np.arange(32), labels][:, None]).sum(-1)
  for k in (1, 3, 10):
    got = jax.jit(metrics.topk_correct, static_argnums=2)(logits, labels, k)
    assert got.dtype == jnp.float32 and got.shape == (32,)
    np.testing.assert_array_equal(got, (rank < k).astype(np.float32))
  np.testing.assert_array_equal(
      metrics.topk_correct(logits, labels, 1),
      (logits.argmax(-1) == labels).astype(np.float32))


def test_topk_correct_by_hand_and_ties():
  logits = jnp.array([[0.1, 0.5, 0.4], [0.3, 0.2, 0.1]])
  labels = jnp.array([2, 2])
  np.testing.assert_array_equal(metrics.topk_correct(logits, labels, 1),
                                [0.0, 0.0])
  np.testing.assert_array_equal(metrics.topk_correct(logits, labels, 2),
                                [1.0, 0.0])
  # Constant logits: only the lowest class index counts as top-1 (argmax).
  flat = jnp.zeros([3, 4])
  np.testing.assert_array_equal(
      metrics.topk_correct(flat, jnp.array([0, 1, 3]), 1), [1.0, 0.0, 0.0])


@pytest.mark.parametrize('k', [0, 4])
def test_topk_correct_rejects_bad_k(k):
  with pytest.raises(ValueError, match='k must be'):
    metrics.topk_correct(jnp.zeros([2, 3]), jnp.zeros([2], jnp.int32), k)


def test_confusion_matrix_and_accuracies():
  labels = np.array([0, 0, 0, 1, 1, 3, 3, 3, 3, 2])
  preds = np.array([0, 1, 0, 1, 1, 3, 0, 3, 3, 1])
  mask = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0])  # Class 2 only in padding.
  confusion = metrics.confusion_matrix(preds, labels, 4, mask=mask)
  assert confusion.dtype == np.int64
  np.testing.assert_array_equal(confusion, [[2, 1, 0, 0],
                                            [0, 2, 0, 0],
                                            [0, 0, 0, 0],
                                            [1, 0, 0, 3]])
  per_class = metrics.per_class_accuracy(confusion)
  np.testing.assert_allclose(per_class[[0, 1, 3]], [2 / 3, 1.0, 3 / 4])
  assert np.isnan(per_class[2])
  np.testing.assert_allclose(metrics.mean_class_accuracy(confusion),
                             (2 / 3 + 1.0 + 3 / 4) / 3)
  np.testing.assert_allclose(metrics.accuracy(confusion), 7 / 9)


def test_confusion_matrices_add_over_batches():
  rng = np.random.default_rng(1)
  preds = rng.integers(0, 5, size=40)
  labels = rng.integers(0, 5, size=40)
  whole = metrics.confusion_matrix(preds, labels, 5)
  parts = sum(metrics.confusion_matrix(preds[i:i + 8], labels[i:i + 8], 5)
              for i in range(0, 40, 8))
  np.testing.assert_array_equal(whole, parts)
  assert whole.sum() == 40
  np.testing.assert_allclose(metrics.accuracy(whole),
                             np.mean(preds == labels))


def test_mean_class_accuracy_differs_from_overall_on_imbalance():
  # 9 examples of class 0 all right, 1 of class 1 wrong: 90% vs 50%.
  confusion = np.array([[9, 0], [1, 0]])
  assert metrics.accuracy(confusion) == pytest.approx(0.9)
  assert metrics.mean_class_accuracy(confusion) == pytest.approx(0.5)


def test_confusion_matrix_rejects_bad_inputs():
  with pytest.raises(ValueError, match='labels must be in'):
    metrics.confusion_matrix(np.array([0]), np.array([5]), 5)
  with pytest.raises(ValueError, match='preds must be in'):
    metrics.confusion_matrix(np.array([-1]), np.array([0]), 5)
  with pytest.raises(ValueError, match=r'\[B\]'):
    metrics.confusion_matrix(np.array([0, 1]), np.array([0]), 5)
  with pytest.raises(ValueError, match='mask'):
    metrics.confusion_matrix(np.array([0]), np.array([0]), 5,
                             mask=np.array([1, 1]))
  # Out-of-range labels hidden by the mask are fine (padding).
  out = metrics.confusion_matrix(np.array([0, 0]), np.array([0, 99]), 2,
                                 mask=np.array([True, False]))
  assert out.sum() == 1


def test_empty_confusion_rejected():
  with pytest.raises(ValueError, match='no examples'):
    metrics.mean_class_accuracy(np.zeros([3, 3], np.int64))
  with pytest.raises(ValueError, match='no examples'):
    metrics.accuracy(np.zeros([3, 3], np.int64))
  with pytest.raises(ValueError, match=r'\[K, K\]'):
    metrics.per_class_accuracy(np.zeros([3, 2]))
