"""MixUp/CutMix as DeepMind's released P2 training code (image_ops.mix_group).

The released recipe (deepmind-research perceiver/train/dataset.py): a group
of 2n examples makes n, the first half MixUp of [0, n/2) with [n/2, n), the
second half CutMix of [n, 3n/2) with [3n/2, 2n); ratios per example.
Images here are coded so that each output says where its pixels came from:
example i is the one-hot channel vector e_i at every pixel, so an output's
channel i is the weight of example i at that pixel.
"""

import numpy as np
import pytest
from scipy import stats
import tensorflow as tf

from perceiver_jax.data import image_ops
from perceiver_jax.data import imagenet


def _seed(i: int) -> tf.Tensor:
  return tf.constant([i, 3], tf.int64)


def _coded_group(group: int, height: int = 12, width: int = 10):
  """Images [2n, H, W, 2n] (example i = e_i everywhere), labels 0..2n-1."""
  images = np.broadcast_to(np.eye(group, dtype=np.float32)[:, None, None],
                           [group, height, width, group])
  return tf.constant(images), tf.range(group, dtype=tf.int32)


def _mix(group, seed, mixup_alpha=0.2, cutmix_alpha=1.0, **kwargs):
  images, labels = _coded_group(group, **kwargs)
  out = image_ops.mix_group(images, labels, seed, mixup_alpha=mixup_alpha,
                            cutmix_alpha=cutmix_alpha)
  return {k: v.numpy() for k, v in out.items()}


def test_which_examples_get_which_and_their_partners():
  group = 16  # n = 8 outputs: 4 MixUp, 4 CutMix.
  out = _mix(group, _seed(0))
  n = group // 2
  assert out['inputs'].shape == (n, 12, 10, group)
  np.testing.assert_array_equal(out['is_cutmix'], [False] * 4 + [True] * 4)
  np.testing.assert_array_equal(out['label'], [0, 1, 2, 3, 8, 9, 10, 11])
  np.testing.assert_array_equal(out['mix_label'], [4, 5, 6, 7, 12, 13, 14, 15])
  # Never mixed with itself; every example of the group used exactly once.
  assert np.all(out['label'] != out['mix_label'])
  assert sorted([*out['label'], *out['mix_label']]) == list(range(group))
  weights = out['inputs']  # [n, H, W, 2n]: where each pixel came from.
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
  for j in range(n):
    own, partner = out['label'][j], out['mix_label'][j]
    others = np.delete(weights[j], [own, partner], axis=-1)
    assert np.all(others == 0)
    if out['is_cutmix'][j]:  # Each pixel wholly one example's.
      assert set(np.unique(weights[j, ..., own])) <= {0.0, 1.0}
      np.testing.assert_allclose(weights[j, ..., own].mean(),
                                 out['ratio'][j], atol=1e-6)
    else:  # One blend over the whole image.
      np.testing.assert_allclose(weights[j, ..., own], out['ratio'][j],
                                 atol=1e-6)
  # Per-example ratios: no two equal within the group.
  assert len(set(out['ratio'].tolist())) == n


def test_one_kind_only_mixes_the_first_half_with_the_second():
  for mixup_alpha, cutmix_alpha, cut in ((0.2, 0.0, False), (0.0, 1.0, True)):
    out = _mix(8, _seed(1), mixup_alpha, cutmix_alpha)
    np.testing.assert_array_equal(out['is_cutmix'], [cut] * 4)
    np.testing.assert_array_equal(out['label'], [0, 1, 2, 3])
    np.testing.assert_array_equal(out['mix_label'], [4, 5, 6, 7])
  assert image_ops.mix_split(5, mixup=True, cutmix=True) == (2, 3)
  assert image_ops.mix_split(5, mixup=True, cutmix=False) == (5, 0)


def test_label_probs_are_the_pixel_area_or_blend_ratio():
  out = _mix(12, _seed(2), height=9, width=7)
  probs = image_ops.mixed_label_probs(out['label'], out['mix_label'],
                                      out['ratio'], 12).numpy()
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
  for j in range(6):
    # Label share of each example = its share of the pixels (mean weight).
    np.testing.assert_allclose(probs[j], out['inputs'][j].mean((0, 1)),
                               atol=1e-6)
  # Two examples of one class: all mass on that class.
  same = image_ops.mixed_label_probs(tf.constant([3]), tf.constant([3]),
                                     tf.constant([0.3]), 5).numpy()
  np.testing.assert_allclose(same, [[0, 0, 0, 1, 0]], atol=1e-7)


def test_mixup_ratios_are_beta_per_example():
  alpha, num = 0.2, 4000
  images = tf.zeros([2 * num, 1, 1, 1])
  labels = tf.zeros([2 * num], tf.int32)
  out = image_ops.mix_group(images, labels, _seed(3),
                            mixup_alpha=alpha, cutmix_alpha=0.0)
  lam = out['ratio'].numpy()
  assert lam.shape == (num,)
  np.testing.assert_allclose(lam.mean(), 0.5, atol=0.02)
  np.testing.assert_allclose(lam.var(), 1 / (4 * (2 * alpha + 1)), rtol=0.05)
  assert stats.kstest(lam, stats.beta(alpha, alpha).cdf).pvalue > 0.01
  # Not Beta(1, 1): the test can tell.
  assert stats.kstest(lam, stats.uniform.cdf).pvalue < 1e-6


def _released_cutmix_ratios(rng, num, height, width):
  """NumPy re-derivation of the released `cutmix_padding` box areas."""
  r_x = rng.integers(0, width, num)
  r_y = rng.integers(0, height, num)
  side = np.sqrt(1.0 - rng.uniform(size=num))
  r_w = (side * width).astype(np.int32)  # Truncation, as tf.cast.
  r_h = (side * height).astype(np.int32)
  x0, x1 = (np.clip(r_x - r_w // 2, 0, width), np.clip(r_x + r_w // 2, 0,
                                                       width))
  y0, y1 = (np.clip(r_y - r_h // 2, 0, height), np.clip(r_y + r_h // 2, 0,
                                                        height))
  return (x1 - x0) * (y1 - y0) / (height * width)


def test_cutmix_box_areas_follow_the_released_distribution():
  num, height, width = 4000, 24, 20
  masks, ratios = image_ops.cutmix_masks(num, height, width, _seed(4))
  masks, ratios = masks.numpy(), ratios.numpy()
  assert masks.shape == (num, height, width, 1)
  np.testing.assert_allclose(masks.mean((1, 2, 3)), ratios, atol=1e-6)
  # Each mask is one axis-aligned box (rows and columns in one run).
  for mask in masks[:50, ..., 0]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size:
      assert mask.sum() == rows.size * cols.size
      assert np.all(np.diff(rows) == 1) and np.all(np.diff(cols) == 1)
  want = _released_cutmix_ratios(np.random.default_rng(0), num, height, width)
  np.testing.assert_allclose(ratios.mean(), want.mean(), atol=0.02)
  # In whole pixels: float32 and float64 fractions would split ties.
  pixels = lambda r: np.round(r * height * width).astype(int)
  assert stats.ks_2samp(pixels(ratios), pixels(want)).pvalue > 0.01
  # Box side sqrt(1 - p): unclipped area ~ 1 - p, so about 0.5 on average
  # less what the clipping at the edges removes.
  assert 0.2 < ratios.mean() < 0.5
  with pytest.raises(ValueError, match='alpha=0'):
    image_ops.cutmix_masks(2, 4, 4, _seed(0), alpha=0.0)


def test_deterministic_under_a_seed_and_the_same_in_tf_data():
  images, labels = _coded_group(8)
  fn = lambda x, y, seed: image_ops.mix_group(
      x, y, seed, mixup_alpha=0.2, cutmix_alpha=1.0)
  eager = {k: v.numpy() for k, v in fn(images, labels, _seed(5)).items()}
  again = {k: v.numpy() for k, v in fn(images, labels, _seed(5)).items()}
  other = fn(images, labels, _seed(6))['ratio'].numpy()
  ds = tf.data.Dataset.from_tensors((images, labels, _seed(5))).map(fn)
  graph = {k: v.numpy() for k, v in ds.get_single_element().items()}
  for key in eager:
    np.testing.assert_array_equal(eager[key], again[key])
    np.testing.assert_array_equal(eager[key], graph[key])
  assert not np.array_equal(eager['ratio'], other)


def test_the_pipeline_stage_mixes_groups_of_two_device_batches():
  # imagenet.make_dataset's stage: batch(2n) -> mix -> unbatch -> batch.
  per_device, num_classes = 4, 10
  examples = tf.data.Dataset.range(64).map(lambda i: {
      'inputs': tf.fill([6, 6, 3], tf.cast(i, tf.float32)),
      'label': tf.cast(i % num_classes, tf.int32),
      'mask': tf.constant(1.0)})
  options = {'mixup_alpha': 0.2, 'cutmix_alpha': 1.0}
  ds = examples.batch(2 * per_device, drop_remainder=True).enumerate().map(
      lambda step, group: imagenet._mix_group(  # pylint: disable=protected-access
          group, tf.random.experimental.stateless_fold_in(
              tf.constant([0, 2], tf.int64), step), options, num_classes))
  batches = list(ds.unbatch().batch(per_device).as_numpy_iterator())
  assert len(batches) == 8  # 64 examples read for 32 trained on.
  for step, batch in enumerate(batches):
    assert set(batch) == {'inputs', 'label', 'mask', 'label_probs'}
    assert batch['label_probs'].shape == (per_device, num_classes)
    np.testing.assert_allclose(batch['label_probs'].sum(-1), 1.0, atol=1e-6)
    first = 8 * step  # Group `step` holds examples first .. first + 7.
    np.testing.assert_array_equal(
        batch['label'], np.array([first, first + 1, first + 4, first + 5])
        % num_classes)
    # MixUp outputs blend their own value and their partner's (+2).
    values = batch['inputs'][:2, 0, 0, 0]
    lam = (first + np.arange(2) + 2 - values) / 2
    own = batch['label_probs'][np.arange(2), batch['label'][:2]]
    np.testing.assert_allclose(own, lam, atol=1e-5)
  with pytest.raises(ValueError, match='mixup_alpha=-1'):
    image_ops.mix_group(*_coded_group(4), _seed(0), mixup_alpha=-1,
                        cutmix_alpha=1.0)
  with pytest.raises(ValueError, match='even group'):
    image_ops.mix_group(*_coded_group(5), _seed(0), mixup_alpha=0.2,
                        cutmix_alpha=1.0)
