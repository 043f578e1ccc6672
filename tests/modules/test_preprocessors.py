"""Tests of the input preprocessors: shapes, contents, masks, dropout."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax.ops import byte_array
from perceiver_jax.modules import position_encoding
from perceiver_jax.modules import preprocessors


def _run(make, inputs, *, is_training=False, seed=0):
  """Builds `make()` in a transform; returns ((x, mask), params)."""
  f = hk.transform(lambda x: make()(x, is_training=is_training))
  params = f.init(jax.random.key(seed), inputs)
  out = f.apply(params, jax.random.key(seed + 1), inputs)
  return out, params


def _shape(make, input_shape, batch=2):
  """Byte array shape for per-example `input_shape`, via jax.eval_shape."""
  def spec(s):
    return jax.ShapeDtypeStruct((batch,) + tuple(s), jnp.float32)
  inputs = ({k: spec(v) for k, v in input_shape.items()}
            if isinstance(input_shape, dict) else spec(input_shape))
  f = hk.transform(lambda x: make()(x, is_training=False))
  rng = jax.random.key(0)
  params = jax.eval_shape(lambda x: f.init(rng, x), inputs)
  x, _ = jax.eval_shape(lambda p, x: f.apply(p, rng, x), params, inputs)
  # The cheap path must agree with the traced one.
  assert preprocessors.compute_output_shape(make, input_shape) == x.shape[1:]
  return x.shape


def _grid_ff(grid, num_bands, max_resolution=None):
  positions = position_encoding.build_linear_positions(grid)
  return position_encoding.fourier_features(
      positions.reshape(-1, len(grid)), num_bands, max_resolution or grid)


def _image(shape, seed=0):
  return jax.random.uniform(jax.random.key(seed), shape)


class TestPaperSizes:

  def test_imagenet_pixels(self):
    shape = _shape(lambda: preprocessors.ImagePreprocessor(
        num_freq_bands=64, max_resolution=224), (224, 224, 3))
    assert shape == (2, 50_176, 261)

  def test_imagenet_learned(self):
    shape = _shape(lambda: preprocessors.ImagePreprocessor(
        position_encoding_type='learned'), (224, 224, 3))
    assert shape == (2, 50_176, 131)

  def test_imagenet_conv(self):
    shape = _shape(lambda: preprocessors.ImagePreprocessor(
        prep_type='conv', num_freq_bands=64), (224, 224, 3))
    assert shape == (2, 56 * 56, 64 + 258)

  def test_raw_audio(self):
    shape = _shape(lambda: preprocessors.AudioPreprocessor(
        samples_per_patch=128, num_freq_bands=64, max_resolution=480),
                   (61_440,))
    assert shape == (2, 480, 128 + 129)

  def test_mel_spectrogram(self):
    shape = _shape(lambda: preprocessors.SpectrogramPreprocessor(
        (1, 1), num_freq_bands=32, max_resolution=(96, 50)), (96, 50))
    assert shape == (2, 4_800, 1 + 2 * 65)

  def test_video(self):
    shape = _shape(lambda: preprocessors.VideoPreprocessor(
        (2, 8, 8), num_freq_bands=16), (32, 224, 224, 3), batch=1)
    assert shape == (1, 12_544, 483)

  def test_point_cloud(self):
    shape = _shape(lambda: preprocessors.PointCloudPreprocessor(64, 1120),
                   (2048, 3))
    assert shape == (2, 2048, 387)

  @pytest.mark.parametrize('audio, inputs, length', [
      ('raw', (61_440,), 13_024), ('mel', (96, 50), 17_344)])
  def test_audio_video(self, audio, inputs, length):
    def make():
      if audio == 'raw':
        audio_pre = preprocessors.AudioPreprocessor(128, 64, 480)
      else:
        audio_pre = preprocessors.SpectrogramPreprocessor((1, 1), 32, (96, 50))
      return preprocessors.MultimodalPreprocessor(
          {audio: audio_pre,
           'video': preprocessors.VideoPreprocessor((2, 8, 8), 16)},
          min_padding_size=4, modality_dropout={'video': 0.3})
    shape = _shape(make, {audio: inputs, 'video': (32, 224, 224, 3)},
                   batch=1)
    assert shape == (1, length, 483 + 4)


class TestImagePreprocessor:

  def test_pixels_contents(self):
    images = _image((2, 4, 5, 3))
    (x, mask), params = _run(
        lambda: preprocessors.ImagePreprocessor(num_freq_bands=2), images)
    assert mask is None and not params
    assert x.shape == (2, 20, 3 + 2 * 5)
    np.testing.assert_array_equal(x[:, :, :3], images.reshape(2, 20, 3))
    # Default max_resolution: the image's (H, W).
    np.testing.assert_allclose(x[0, :, 3:], _grid_ff((4, 5), 2), atol=1e-6)
    np.testing.assert_array_equal(x[1, :, 3:], x[0, :, 3:])

  def test_max_resolution_is_used(self):
    images = _image((1, 4, 4, 1))
    (x, _), _ = _run(lambda: preprocessors.ImagePreprocessor(
        num_freq_bands=3, max_resolution=(10, 20)), images)
    np.testing.assert_allclose(x[0, :, 1:], _grid_ff((4, 4), 3, (10, 20)),
                               atol=1e-6)

  def test_patches_contents(self):
    images = _image((2, 8, 12, 2))
    (x, _), _ = _run(lambda: preprocessors.ImagePreprocessor(
        'patches', patch_size=4, num_freq_bands=3), images)
    assert x.shape == (2, 2 * 3, 4 * 4 * 2 + 2 * 7)
    # Patch (row 1, col 2) is input 1 * 3 + 2, flattened as (y, x, channel).
    np.testing.assert_array_equal(
        x[:, 5, :32], images[:, 4:8, 8:12, :].reshape(2, 32))
    # Fourier features over the 2 x 3 patch grid, not the pixels.
    np.testing.assert_allclose(x[0, :, 32:], _grid_ff((2, 3), 3), atol=1e-6)

  def test_conv(self):
    images = _image((2, 16, 12, 3))
    (x, _), params = _run(lambda: preprocessors.ImagePreprocessor(
        'conv', conv_channels=8, num_freq_bands=2, name='pre'), images)
    assert x.shape == (2, 4 * 3, 8 + 10)
    assert params['pre/conv']['w'].shape == (7, 7, 3, 8)
    assert float(jnp.min(x[..., :8])) >= 0.0  # ReLU then max-pool.
    np.testing.assert_allclose(x[0, :, 8:], _grid_ff((4, 3), 2), atol=1e-6)

  def test_learned_and_none(self):
    images = _image((2, 4, 4, 3))
    (x, _), params = _run(lambda: preprocessors.ImagePreprocessor(
        position_encoding_type='learned', learned_pos_channels=6,
        name='pre'), images)
    embs = params['pre/position_encoding']['pos_embs']
    assert embs.shape == (16, 6)
    assert x.shape == (2, 16, 9)
    np.testing.assert_array_equal(x[1, :, 3:], embs)
    (x, _), params = _run(lambda: preprocessors.ImagePreprocessor(
        position_encoding_type='none'), images)
    assert not params
    np.testing.assert_array_equal(x, images.reshape(2, 16, 3))

  def test_permutation_applied_after_features(self):
    images = _image((2, 4, 4, 3))
    perm = preprocessors.make_permutation(16, seed=7)
    (plain, _), _ = _run(lambda: preprocessors.ImagePreprocessor(
        num_freq_bands=2), images)
    (permuted, _), _ = _run(lambda: preprocessors.PermutedPreprocessor(
        preprocessors.ImagePreprocessor(num_freq_bands=2), seed=7), images)
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
    images = _image((2, 6, 6, 3))
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
  ])
  def test_bad_hyperparameters(self, kwargs, match):
    with pytest.raises(ValueError, match=match):
      _run(lambda: preprocessors.ImagePreprocessor(**kwargs),
           _image((1, 4, 4, 3)))

  @pytest.mark.parametrize('kwargs, shape, match', [
      (dict(prep_type='patches', patch_size=3), (1, 4, 6, 3),
       r'patch shape \(3, 3\) does not divide the input shape \(4, 6\)'),
      (dict(max_resolution=(4, 4, 4)), (1, 4, 4, 3), 'max_resolution'),
      (dict(), (1, 16, 3), 'ImagePreprocessor input'),
  ])
  def test_bad_inputs(self, kwargs, shape, match):
    with pytest.raises(ValueError, match=match):
      _run(lambda: preprocessors.ImagePreprocessor(**kwargs), _image(shape))
    with pytest.raises(ValueError, match=match):
      preprocessors.compute_output_shape(
          lambda: preprocessors.ImagePreprocessor(**kwargs), shape[1:])


class TestSequencePreprocessors:

  def test_audio_contents(self):
    audio = _image((2, 24))
    (x, mask), _ = _run(lambda: preprocessors.AudioPreprocessor(
        samples_per_patch=4, num_freq_bands=3), audio)
    assert mask is None and x.shape == (2, 6, 4 + 7)
    np.testing.assert_array_equal(x[:, 2, :4], audio[:, 8:12])
    np.testing.assert_allclose(x[0, :, 4:], _grid_ff((6,), 3), atol=1e-6)

  def test_spectrogram_contents(self):
    spec = _image((2, 4, 6))
    (x, _), _ = _run(lambda: preprocessors.SpectrogramPreprocessor(
        (2, 3), num_freq_bands=2, max_resolution=(8, 8)), spec)
    assert x.shape == (2, 2 * 2, 6 + 10)
    # Patch (time 1, freq 0), flattened time-major.
    np.testing.assert_array_equal(x[:, 2, :6], spec[:, 2:4, 0:3].reshape(2, 6))
    np.testing.assert_allclose(x[0, :, 6:], _grid_ff((2, 2), 2, (8, 8)),
                               atol=1e-6)

  def test_video_contents(self):
    video = _image((2, 4, 8, 8, 3))
    (x, _), _ = _run(lambda: preprocessors.VideoPreprocessor(
        (2, 4, 4), num_freq_bands=2), video)
    assert x.shape == (2, 8, 2 * 4 * 4 * 3 + 3 * 5)
    # Patch (t 1, y 0, x 1) is input 1*4 + 0*2 + 1, flattened (t, y, x, c).
    np.testing.assert_array_equal(
        x[:, 5, :96], video[:, 2:4, 0:4, 4:8, :].reshape(2, 96))
    np.testing.assert_allclose(x[0, :, 96:], _grid_ff((2, 2, 2), 2),
                               atol=1e-6)

  def test_point_cloud_contents(self):
    points = jax.random.uniform(jax.random.key(0), (2, 50, 3), minval=-1.0,
                                maxval=1.0)
    (x, mask), params = _run(
        lambda: preprocessors.PointCloudPreprocessor(8, 1120), points)
    assert mask is None and not params and x.shape == (2, 50, 3 * 17)
    expected = position_encoding.fourier_features(
        np.asarray(points, np.float64), 8, 1120)
    # float32 phases up to ~1760 rad: ~1e-4 absolute error.
    np.testing.assert_allclose(x, expected, atol=5e-4)

  @pytest.mark.parametrize('make, shape, match', [
      (lambda: preprocessors.AudioPreprocessor(5), (2, 24), r'\(5,\)'),
      (lambda: preprocessors.AudioPreprocessor(0), (2, 24),
       'samples_per_patch'),
      (lambda: preprocessors.AudioPreprocessor(4), (2, 24, 1),
       'AudioPreprocessor input'),
      (lambda: preprocessors.AudioPreprocessor(4, max_resolution=(3, 3)),
       (2, 24), 'max_resolution'),
      (lambda: preprocessors.SpectrogramPreprocessor((2,)), (2, 4, 4),
       'patch_shape'),
      (lambda: preprocessors.SpectrogramPreprocessor((3, 1)), (2, 4, 4),
       'does not divide'),
      (lambda: preprocessors.VideoPreprocessor((2, 8)), (1, 2, 8, 8, 3),
       'patch_shape'),
      (lambda: preprocessors.VideoPreprocessor((2, 8, 8)), (1, 3, 8, 8, 3),
       r'\(3, 8, 8\)'),
      (lambda: preprocessors.VideoPreprocessor(num_freq_bands=0),
       (1, 2, 8, 8, 3), 'num_freq_bands'),
      (lambda: preprocessors.PointCloudPreprocessor(4, (10, 10)), (1, 5, 3),
       'has 2 entries but the points have 3 coordinates'),
      (lambda: preprocessors.PointCloudPreprocessor(4, None), (1, 5, 3),
       'max_resolution'),
  ])
  def test_errors(self, make, shape, match):
    with pytest.raises(ValueError, match=match):
      _run(make, _image(shape))

  @pytest.mark.parametrize('make, shape', [
      (lambda: preprocessors.ImagePreprocessor(num_freq_bands=2), (1, 4, 4, 3)),
      (lambda: preprocessors.VideoPreprocessor((1, 2, 2), 2), (1, 2, 4, 4, 3)),
      (lambda: preprocessors.PointCloudPreprocessor(2), (1, 5, 3)),
  ])
  def test_integer_inputs_rejected(self, make, shape):
    with pytest.raises(ValueError, match='floating-point inputs.*uint8'):
      _run(make, jnp.zeros(shape, jnp.uint8))


def _fixed(length, channels, value, mask=None):
  """A parameter-free modality returning constant values (and a mask)."""
  def pre(inputs, *, is_training):
    del is_training
    batch = inputs.shape[0]
    x = jnp.full((batch, length, channels), value, jnp.float32)
    return x, (None if mask is None
               else jnp.broadcast_to(jnp.asarray(mask), (batch, length)))
  return pre


class TestMultimodalPreprocessor:

  def _inputs(self, batch=2):
    return {'video': jnp.zeros((batch, 1)), 'audio': jnp.zeros((batch, 1))}

  def test_padding_and_order(self):
    make = lambda: preprocessors.MultimodalPreprocessor(
        {'video': _fixed(3, 5, 2.0), 'audio': _fixed(4, 2, 1.0)},
        min_padding_size=1, name='mm')
    (x, mask), params = _run(make, self._inputs())
    assert mask is None
    assert x.shape == (2, 7, 6)
    pads = params['mm']
    assert pads['audio_padding'].shape == (4,)
    assert pads['video_padding'].shape == (1,)
    # Sorted order: audio first; each keeps its values, then its padding.
    np.testing.assert_array_equal(x[:, :4, :2], 1.0)
    np.testing.assert_array_equal(x[:, 4:, :5], 2.0)
    np.testing.assert_array_equal(
        x[:, :4, 2:], jnp.broadcast_to(pads['audio_padding'], (2, 4, 4)))
    np.testing.assert_array_equal(
        x[:, 4:, 5:], jnp.broadcast_to(pads['video_padding'], (2, 3, 1)))
    assert 0 < float(jnp.std(pads['audio_padding'])) < 0.05

  def test_no_padding_parameter_when_already_wide_enough(self):
    make = lambda: preprocessors.MultimodalPreprocessor(
        {'video': _fixed(3, 5, 2.0), 'audio': _fixed(4, 2, 1.0)},
        min_padding_size=0, name='mm')
    (x, _), params = _run(make, self._inputs())
    assert x.shape == (2, 7, 5)
    assert set(params['mm']) == {'audio_padding'}

  def test_paper_padding_channels(self):
    """video 483 + min_padding_size 4 = 487; raw audio 257 + 230 padding."""
    make = lambda: preprocessors.MultimodalPreprocessor(
        {'audio': preprocessors.AudioPreprocessor(128, 64, 480),
         'video': preprocessors.VideoPreprocessor((2, 8, 8), 16)},
        min_padding_size=4, name='mm')
    inputs = {'audio': jax.ShapeDtypeStruct((1, 61_440), jnp.float32),
              'video': jax.ShapeDtypeStruct((1, 32, 224, 224, 3),
                                            jnp.float32)}
    f = hk.transform(lambda x: make()(x, is_training=False))
    params = jax.eval_shape(lambda x: f.init(jax.random.key(0), x), inputs)
    assert params['mm']['audio_padding'].shape == (230,)
    assert params['mm']['video_padding'].shape == (4,)

  def test_mask(self):
    make = lambda: preprocessors.MultimodalPreprocessor({
        'video': _fixed(3, 2, 2.0),
        'audio': _fixed(4, 2, 1.0, mask=[True, True, False, False])})
    (x, mask), _ = _run(make, self._inputs())
    assert x.shape[:2] == mask.shape == (2, 7) and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(
        mask, np.tile([True, True, False, False, True, True, True], (2, 1)))

  def test_modality_dropout(self):
    batch = 256
    make = lambda: preprocessors.MultimodalPreprocessor(
        {'video': _fixed(3, 5, 2.0), 'audio': _fixed(4, 2, 1.0)},
        min_padding_size=1, modality_dropout={'video': 0.3}, name='mm')
    (x, _), params = _run(make, self._inputs(batch), is_training=True)
    video = x[:, 4:, :5]
    dropped = np.all(video == 0.0, axis=(1, 2))
    kept = np.all(video == 2.0, axis=(1, 2))
    # Each example keeps or drops its whole video.
    np.testing.assert_array_equal(dropped, ~kept)
    assert 0.2 < dropped.mean() < 0.4
    # Audio and the learned padding are untouched.
    np.testing.assert_array_equal(x[:, :4, :2], 1.0)
    np.testing.assert_array_equal(
        x[:, 4:, 5:], jnp.broadcast_to(params['mm']['video_padding'],
                                       (batch, 3, 1)))
    # Another rng key drops other examples.
    (x2, _), _ = _run(make, self._inputs(batch), is_training=True, seed=5)
    assert not np.array_equal(dropped, np.all(x2[:, 4:, :5] == 0.0,
                                              axis=(1, 2)))

  def test_no_dropout_at_eval_and_needs_no_rng(self):
    make = lambda: preprocessors.MultimodalPreprocessor(
        {'video': _fixed(3, 5, 2.0), 'audio': _fixed(4, 2, 1.0)},
        modality_dropout={'video': 1.0})
    f = hk.transform(lambda x, t: make()(x, is_training=t))
    params = f.init(jax.random.key(0), self._inputs(), False)
    x, _ = f.apply(params, None, self._inputs(), False)
    np.testing.assert_array_equal(x[:, 4:, :5], 2.0)
    x, _ = f.apply(params, jax.random.key(1), self._inputs(), True)
    np.testing.assert_array_equal(x[:, 4:, :5], 0.0)

  def test_output_shape(self):
    make = lambda: preprocessors.MultimodalPreprocessor(
        {'spectrogram': preprocessors.SpectrogramPreprocessor((1, 1), 2),
         'video': preprocessors.VideoPreprocessor((2, 4, 4), 2)},
        min_padding_size=3)
    shape = _shape(make, {'spectrogram': (4, 3), 'video': (2, 8, 8, 3)})
    assert shape == (2, 12 + 4, 2 * 4 * 4 * 3 + 15 + 3)

  @pytest.mark.parametrize('kwargs, match', [
      (dict(modalities={}), 'at least one'),
      (dict(min_padding_size=-1), 'min_padding_size'),
      (dict(modality_dropout={'text': 0.1}), r"\['text'\]"),
      (dict(modality_dropout={'video': 1.5}), '1.5'),
  ])
  def test_bad_hyperparameters(self, kwargs, match):
    kwargs = dict(dict(modalities={'video': _fixed(1, 1, 0.0)}), **kwargs)
    with pytest.raises(ValueError, match=match):
      _run(lambda: preprocessors.MultimodalPreprocessor(**kwargs),
           {'video': jnp.zeros((1, 1))})

  def test_bad_inputs(self):
    make = lambda: preprocessors.MultimodalPreprocessor(
        {'video': _fixed(3, 5, 2.0), 'audio': _fixed(4, 2, 1.0)})
    with pytest.raises(ValueError, match=r"lack modalities \['audio'\]"):
      _run(make, {'video': jnp.zeros((1, 1))})
    with pytest.raises(ValueError, match='dict of inputs'):
      _run(make, jnp.zeros((1, 1)))
    with pytest.raises(ValueError, match='batch size'):
      _run(make, {'video': jnp.zeros((1, 1)), 'audio': jnp.zeros((2, 1))})


@pytest.mark.parametrize('make, shape', [
    (lambda s: preprocessors.ImagePreprocessor(
        num_freq_bands=3, split_positions=s), (5, 6, 3)),
    (lambda s: preprocessors.PermutedPreprocessor(
        preprocessors.ImagePreprocessor(
            'patches', patch_size=2, num_freq_bands=3, split_positions=s),
        seed=1), (4, 6, 2)),
    (lambda s: preprocessors.AudioPreprocessor(
        samples_per_patch=4, num_freq_bands=5, split_positions=s), (32,)),
    (lambda s: preprocessors.SpectrogramPreprocessor(
        num_freq_bands=2, split_positions=s), (6, 5)),
    (lambda s: preprocessors.VideoPreprocessor(
        patch_shape=(1, 2, 2), num_freq_bands=2, split_positions=s),
     (2, 4, 4, 3)),
])
def test_split_positions_hold_the_same_byte_array(make, shape):
  inputs = _image((2,) + shape)
  (split, _), _ = _run(lambda: make(True), inputs)
  (dense, _), _ = _run(lambda: make(False), inputs)
  assert isinstance(split, byte_array.SplitByteArray)
  assert split.shared.ndim == 2 and split.shape == dense.shape
  np.testing.assert_array_equal(split.dense(), dense)


def test_split_positions_leave_other_encodings_dense():
  (x, _), _ = _run(lambda: preprocessors.ImagePreprocessor(
      position_encoding_type='learned', learned_pos_channels=4,
      split_positions=True), _image((2, 3, 3, 3)))
  assert isinstance(x, jax.Array) and x.shape == (2, 9, 7)
