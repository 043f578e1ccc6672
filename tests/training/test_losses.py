"""Tests for perceiver_jax.training.losses against NumPy re-derivations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax.training import losses


def _np_log_softmax(logits):
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _logits(batch=6, classes=5, seed=0, scale=3.0):
  return np.random.default_rng(seed).normal(
      scale=scale, size=[batch, classes]).astype(np.float32)


@pytest.mark.parametrize('eps', [0.0, 0.1, 0.5])
def test_softmax_ce_int_labels(eps):
  logits = _logits()
  labels = np.array([0, 4, 2, 2, 1, 3], np.int32)
  k = logits.shape[1]
  targets = (1 - eps) * np.eye(k)[labels] + eps / k
  expected = -(targets * _np_log_softmax(logits)).sum(-1)
  got = jax.jit(lambda l, y: losses.softmax_cross_entropy(
      l, y, label_smoothing=eps))(logits, labels)
  assert got.shape == (6,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_softmax_ce_smoothing_formula_by_hand():
  # Two classes, equal logits: log p = log(1/2) for both whatever eps.
  got = losses.softmax_cross_entropy(
      jnp.zeros([1, 2]), jnp.array([0]), label_smoothing=0.2)
  np.testing.assert_allclose(got, [np.log(2.0)], rtol=1e-6)
  # Uniform targets (eps = 1) on the logits [0, log 3]: p = [1/4, 3/4].
  got = losses.softmax_cross_entropy(
      jnp.array([[0.0, np.log(3.0)]]), jnp.array([1]), label_smoothing=1.0)
  np.testing.assert_allclose(
      got, [-0.5 * (np.log(0.25) + np.log(0.75))], rtol=1e-6)


@pytest.mark.parametrize('eps', [0.0, 0.1])
def test_softmax_ce_soft_labels(eps):
  logits = _logits(seed=1)
  rng = np.random.default_rng(2)
  probs = rng.dirichlet(np.ones(5), size=6).astype(np.float32)
  targets = (1 - eps) * probs + eps / 5
  expected = -(targets * _np_log_softmax(logits)).sum(-1)
  got = losses.softmax_cross_entropy(logits, probs, label_smoothing=eps)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_soft_one_hot_equals_int_labels():
  logits = _logits(seed=3)
  labels = np.array([1, 0, 3, 4, 2, 2])
  np.testing.assert_allclose(
      losses.softmax_cross_entropy(logits, np.eye(5, dtype=np.float32)[labels],
                                   label_smoothing=0.1),
      losses.softmax_cross_entropy(logits, labels, label_smoothing=0.1),
      rtol=1e-6)


def test_softmax_ce_bf16_logits_upcast_and_stable():
  logits = jnp.array([[1000.0, 0.0], [0.0, 1000.0]], jnp.bfloat16)
  got = losses.softmax_cross_entropy(logits, jnp.array([0, 0]))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, [0.0, 1000.0], atol=1e-3)


@pytest.mark.parametrize('labels, eps', [
    (np.zeros([5], np.int32), 0.0),          # wrong batch
    (np.zeros([6], np.float32), 0.0),        # float index labels
    (np.zeros([6, 4], np.float32), 0.0),     # wrong K
    (np.zeros([6, 5], np.int32), 0.0),       # int probabilities
    (np.zeros([6, 5, 1], np.float32), 0.0),  # rank 3
    (np.zeros([6], np.int32), -0.1),
    (np.zeros([6], np.int32), 1.5),
])
def test_softmax_ce_rejects_bad_inputs(labels, eps):
  with pytest.raises(ValueError):
    losses.softmax_cross_entropy(_logits(), labels, label_smoothing=eps)


def test_sigmoid_ce_matches_numpy():
  logits = _logits(batch=4, classes=7, seed=4, scale=5.0)
  labels = (np.random.default_rng(5).random([4, 7]) < 0.3).astype(np.float32)
  x = logits.astype(np.float64)
  # log(sigmoid(x)) = -log(1 + e^-x); log(1 - sigmoid(x)) = -log(1 + e^x).
  per_class = labels * np.log1p(np.exp(-x)) + (1 - labels) * np.log1p(
      np.exp(x))
  got = jax.jit(losses.sigmoid_cross_entropy)(logits, labels)
  assert got.shape == (4,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, per_class.mean(-1), rtol=1e-5)


def test_sigmoid_ce_finite_for_extreme_logits():
  logits = jnp.array([[200.0, -200.0]], jnp.float32)
  got = losses.sigmoid_cross_entropy(logits, jnp.array([[0.0, 1.0]]))
  np.testing.assert_allclose(got, [200.0], rtol=1e-5)  # mean of 200, 200.


def test_sigmoid_ce_rejects_shape_mismatch():
  with pytest.raises(ValueError, match='do not match'):
    losses.sigmoid_cross_entropy(jnp.zeros([2, 3]), jnp.zeros([2, 4]))
  with pytest.raises(ValueError, match=r'\[B, K\]'):
    losses.sigmoid_cross_entropy(jnp.zeros([3]), jnp.zeros([3]))


def test_masked_mean():
  values = jnp.array([1.0, 2.0, np.nan, 4.0])
  mask = jnp.array([1, 1, 0, 1])
  np.testing.assert_allclose(losses.masked_mean(values, mask), 7.0 / 3)
  np.testing.assert_allclose(
      losses.masked_mean(values, mask.astype(bool)), 7.0 / 3)
  np.testing.assert_allclose(
      losses.masked_mean(values, jnp.array([0.5, 1.5, 0.0, 0.0])),
      (0.5 + 3.0) / 2.0)
  empty = losses.masked_mean(values, jnp.zeros([4]))
  assert float(empty) == 0.0
  with pytest.raises(ValueError):
    losses.masked_mean(values, jnp.ones([3]))


def test_masked_mean_gradient_ignores_padding():
  values = jnp.array([1.0, 2.0, 3.0])
  grad = jax.grad(lambda v: losses.masked_mean(v, jnp.array([1, 0, 1])))(
      values)
  np.testing.assert_allclose(grad, [0.5, 0.0, 0.5])
