"""Tests of the shared preprocessor pieces and ImagePreprocessor."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax.modules import preprocessors
from tests.modules import preprocessor_testing


class TestPaperSizes:

  def test_imagenet_pixels(self):
    shape = preprocessor_testing.shape_of(
        lambda: preprocessors.ImagePreprocessor(
            num_freq_bands=64, max_resolution=224), (224, 224, 3))
    assert shape == (2, 50_176, 261)

  def test_imagenet_learned(self):
    shape = preprocessor_testing.shape_of(
        lambda: preprocessors.ImagePreprocessor(
            position_encoding_type='learned'), (224, 224, 3))
    assert shape == (2, 50_176, 131)

  def test_imagenet_conv(self):
    shape = preprocessor_testing.shape_of(
        lambda: preprocessors.ImagePreprocessor(
            prep_type='conv', num_freq_bands=64), (224, 224, 3))
    assert shape == (2, 56 * 56, 64 + 258)

  def test_imagenet_released_learned(self):
    shape = preprocessor_testing.shape_of(
        lambda: preprocessors.ImagePreprocessor(
            prep_type='conv1x1', conv_channels=256,
            position_encoding_type='learned', learned_pos_channels=256,
            project_pos_dim=256), (224, 224, 3))
    assert shape == (2, 50_176, 256 + 256)


class TestImagePreprocessor:

  def test_pixels_contents(self):
    images = preprocessor_testing.uniform((2, 4, 5, 3))
    (x, mask), params = preprocessor_testing.run(
        lambda: preprocessors.ImagePreprocessor(num_freq_bands=2), images)
    assert mask is None and not params
    assert x.shape == (2, 20, 3 + 2 * 5)
    np.testing.assert_array_equal(x[:, :, :3], images.reshape(2, 20, 3))
    # Default max_resolution: the image's (H, W).
    np.testing.assert_allclose(
        x[0, :, 3:], preprocessor_testing.grid_ff((4, 5), 2), atol=1e-6)
    np.testing.assert_array_equal(x[1, :, 3:], x[0, :, 3:])

  def test_max_resolution_is_used(self):
    images = preprocessor_testing.uniform((1, 4, 4, 1))
    (x, _), _ = preprocessor_testing.run(
        lambda: preprocessors.ImagePreprocessor(
            num_freq_bands=3, max_resolution=(10, 20)), images)
    np.testing.assert_allclose(
        x[0, :, 1:], preprocessor_testing.grid_ff((4, 4), 3, (10, 20)),
        atol=1e-6)

  def test_patches_contents(self):
    images = preprocessor_testing.uniform((2, 8, 12, 2))
    (x, _), _ = preprocessor_testing.run(
        lambda: preprocessors.ImagePreprocessor(
            'patches', patch_size=4, num_freq_bands=3), images)
    assert x.shape == (2, 2 * 3, 4 * 4 * 2 + 2 * 7)
    # Patch (row 1, col 2) is input 1 * 3 + 2, flattened as (y, x, channel).
    np.testing.assert_array_equal(
        x[:, 5, :32], images[:, 4:8, 8:12, :].reshape(2, 32))
    # Fourier features over the 2 x 3 patch grid, not the pixels.
    np.testing.assert_allclose(
        x[0, :, 32:], preprocessor_testing.grid_ff((2, 3), 3), atol=1e-6)

  def test_conv(self):
    images = preprocessor_testing.uniform((2, 16, 12, 3))
    (x, _), params = preprocessor_testing.run(
        lambda: preprocessors.ImagePreprocessor(
            'conv', conv_channels=8, num_freq_bands=2, name='pre'), images)
    assert x.shape == (2, 4 * 3, 8 + 10)
    assert params['pre/conv']['w'].shape == (7, 7, 3, 8)
    assert float(jnp.min(x[..., :8])) >= 0.0  # ReLU then max-pool.
    np.testing.assert_allclose(
        x[0, :, 8:], preprocessor_testing.grid_ff((4, 3), 2), atol=1e-6)

  def test_conv_batch_norm_as_released(self):
    """Conv without bias, BatchNorm (batch statistics when training, moving
    averages as state), ReLU, max-pool; against a jax.lax re-derivation."""
    images = preprocessor_testing.uniform((2, 16, 12, 3))
    f = hk.transform_with_state(
        lambda x, t: preprocessors.ImagePreprocessor(
            'conv', conv_channels=8, num_freq_bands=2, conv_norm='batch_norm',
            name='pre')(x, is_training=t))
    params, state = f.init(jax.random.key(0), images, True)
    assert set(params) == {'pre/conv', 'pre/batchnorm'}
    assert set(params['pre/conv']) == {'w'}  # No bias.
    assert params['pre/batchnorm']['scale'].shape == (1, 1, 1, 8)
    assert set(state) == {'pre/batchnorm/~/mean_ema',
                          'pre/batchnorm/~/var_ema'}
    (x, _), state = f.apply(params, state, None, images, True)
    conv = jax.lax.conv_general_dilated(
        images, params['pre/conv']['w'], (2, 2), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))  # [2, 8, 6, 8]
    mean = conv.mean(axis=(0, 1, 2))
    var = conv.var(axis=(0, 1, 2))
    want = jax.nn.relu((conv - mean) / jnp.sqrt(var + 1e-5))  # Scale 1.
    want = hk.max_pool(want, (1, 3, 3, 1), (1, 2, 2, 1), 'SAME')
    np.testing.assert_allclose(x[..., :8], want.reshape(2, 12, 8),
                               atol=1e-5)
    # One update of zero-debiased averages holds this batch's statistics,
    # so evaluating on the same batch gives the training output.
    mean_ema = state['pre/batchnorm/~/mean_ema']
    assert int(mean_ema['counter']) == 1
    np.testing.assert_allclose(mean_ema['average'].reshape(8), mean,
                               rtol=1e-5, atol=1e-6)
    (x_eval, _), _ = f.apply(params, state, None, images, False)
    np.testing.assert_allclose(x_eval, x, atol=1e-4)

  def test_conv1x1_and_position_projection(self):
    images = preprocessor_testing.uniform((2, 4, 3, 3))
    (x, _), params = preprocessor_testing.run(
        lambda: preprocessors.ImagePreprocessor(
            'conv1x1', conv_channels=5, position_encoding_type='learned',
            learned_pos_channels=6, project_pos_dim=4, name='pre'), images)
    assert x.shape == (2, 12, 5 + 4)
    conv = params['pre/conv1x1']
    assert conv['w'].shape == (1, 1, 3, 5)
    np.testing.assert_allclose(
        x[..., :5], images.reshape(2, 12, 3) @ conv['w'][0, 0] + conv['b'],
        atol=1e-6)
    pos = params['pre/position_encoding']['pos_embs']  # [12, 6]
    proj = params['pre/position_projection']
    for b in range(2):
      np.testing.assert_allclose(x[b, :, 5:], pos @ proj['w'] + proj['b'],
                                 atol=1e-6)

  def test_learned_and_none(self):
    images = preprocessor_testing.uniform((2, 4, 4, 3))
    (x, _), params = preprocessor_testing.run(
        lambda: preprocessors.ImagePreprocessor(
            position_encoding_type='learned', learned_pos_channels=6,
            name='pre'), images)
    embs = params['pre/position_encoding']['pos_embs']
    assert embs.shape == (16, 6)
    assert x.shape == (2, 16, 9)
    np.testing.assert_array_equal(x[1, :, 3:], embs)
    (x, _), params = preprocessor_testing.run(
        lambda: preprocessors.ImagePreprocessor(
            position_encoding_type='none'), images)
    assert not params
    np.testing.assert_array_equal(x, images.reshape(2, 16, 3))

  def test_permutation_applied_after_features(self):
    images = preprocessor_testing.uniform((2, 4, 4, 3))
    perm = preprocessors.make_permutation(16, seed=7)
    (plain, _), _ = preprocessor_testing.run(
        lambda: preprocessors.ImagePreprocessor(num_freq_bands=2), images)
    (permuted, _), _ = preprocessor_testing.run(
        lambda: preprocessors.PermutedPreprocessor(
            preprocessors.ImagePreprocessor(num_freq_bands=2), seed=7),
        images)
    assert not np.allclose(plain, permuted)
    # Rows (pixel + its own position features) move together.
    np.testing.assert_array_equal(permuted, plain[:, perm])
    np.testing.assert_array_equal(permuted[:, np.argsort(perm)], plain)

  def test_make_permutation(self):
    a = preprocessors.make_permutation(100, seed=3)
    np.testing.assert_array_equal(a, preprocessors.make_permutation(100, 3))
    np.testing.assert_array_equal(np.sort(a), np.arange(100))
    assert not np.array_equal(a, preprocessors.make_permutation(100, 4))
    assert not np.array_equal(a, np.arange(100))
    with pytest.raises(ValueError, match='num_positions'):
      preprocessors.make_permutation(0, 1)

  def test_jit_matches_eager(self):
    images = preprocessor_testing.uniform((2, 6, 6, 3))
    f = hk.transform(lambda x: preprocessors.ImagePreprocessor(
        'patches', patch_size=3, num_freq_bands=4)(x, is_training=False)[0])
    np.testing.assert_allclose(jax.jit(f.apply)({}, None, images),
                               f.apply({}, None, images), atol=1e-6)

  @pytest.mark.parametrize('kwargs, match', [
      (dict(prep_type='rgb'), "prep_type 'rgb'"),
      (dict(position_encoding_type='sine'), "position_encoding_type 'sine'"),
      (dict(num_freq_bands=0), 'num_freq_bands'),
      (dict(patch_size=-2), 'patch_size'),
      (dict(learned_pos_init_scale=0.0), 'learned_pos_init_scale'),
      (dict(max_resolution=(0, 4)), 'max_resolution'),
      (dict(conv_norm='layer_norm'), "conv_norm 'layer_norm'"),
      (dict(conv_norm='batch_norm'), "needs prep_type='conv'"),
      (dict(position_encoding_type='none', project_pos_dim=4),
       'project_pos_dim=4 needs position features'),
      (dict(project_pos_dim=0), 'project_pos_dim'),
  ])
  def test_bad_hyperparameters(self, kwargs, match):
    with pytest.raises(ValueError, match=match):
      preprocessor_testing.run(
          lambda: preprocessors.ImagePreprocessor(**kwargs),
          preprocessor_testing.uniform((1, 4, 4, 3)))

  @pytest.mark.parametrize('kwargs, shape, match', [
      (dict(prep_type='patches', patch_size=3), (1, 4, 6, 3),
       r'patch shape \(3, 3\) does not divide the input shape \(4, 6\)'),
      (dict(max_resolution=(4, 4, 4)), (1, 4, 4, 3), 'max_resolution'),
      (dict(), (1, 16, 3), 'ImagePreprocessor input'),
  ])
  def test_bad_inputs(self, kwargs, shape, match):
    with pytest.raises(ValueError, match=match):
      preprocessor_testing.run(
          lambda: preprocessors.ImagePreprocessor(**kwargs),
          preprocessor_testing.uniform(shape))
    with pytest.raises(ValueError, match=match):
      preprocessors.compute_output_shape(
          lambda: preprocessors.ImagePreprocessor(**kwargs), shape[1:])

  def test_integer_inputs_rejected(self):
    with pytest.raises(ValueError, match='floating-point inputs.*uint8'):
      preprocessor_testing.run(
          lambda: preprocessors.ImagePreprocessor(num_freq_bands=2),
          jnp.zeros((1, 4, 4, 3), jnp.uint8))


@pytest.mark.parametrize('make, shape', [
    (lambda s: preprocessors.ImagePreprocessor(
        num_freq_bands=3, split_positions=s), (5, 6, 3)),
    (lambda s: preprocessors.PermutedPreprocessor(
        preprocessors.ImagePreprocessor(
            'patches', patch_size=2, num_freq_bands=3, split_positions=s),
        seed=1), (4, 6, 2)),
])
def test_split_positions_hold_the_same_byte_array(make, shape):
  preprocessor_testing.check_split_positions(make, shape)


def test_split_positions_leave_other_encodings_dense():
  (x, _), _ = preprocessor_testing.run(
      lambda: preprocessors.ImagePreprocessor(
          position_encoding_type='learned', learned_pos_channels=4,
          split_positions=True), preprocessor_testing.uniform((2, 3, 3, 3)))
  assert isinstance(x, jax.Array) and x.shape == (2, 9, 7)
