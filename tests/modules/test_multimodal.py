"""Tests of the multimodal preprocessor: padding, order, masks, dropout."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax.modules import audio_video
from perceiver_jax.modules import multimodal
from tests.modules import preprocessor_testing


@pytest.mark.parametrize('audio, inputs, length', [
    ('raw', (61_440,), 13_024), ('mel', (96, 50), 17_344)])
def test_paper_size_audio_video(audio, inputs, length):
  def make():
    if audio == 'raw':
      audio_pre = audio_video.AudioPreprocessor(128, 64, 480)
    else:
      audio_pre = audio_video.SpectrogramPreprocessor((1, 1), 32, (96, 50))
    return multimodal.MultimodalPreprocessor(
        {audio: audio_pre,
         'video': audio_video.VideoPreprocessor((2, 8, 8), 16)},
        min_padding_size=4, modality_dropout={'video': 0.3})
  shape = preprocessor_testing.shape_of(
      make, {audio: inputs, 'video': (32, 224, 224, 3)}, batch=1)
  assert shape == (1, length, 483 + 4)


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
    make = lambda: multimodal.MultimodalPreprocessor(
        {'video': _fixed(3, 5, 2.0), 'audio': _fixed(4, 2, 1.0)},
        min_padding_size=1, name='mm')
    (x, mask), params = preprocessor_testing.run(make, self._inputs())
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
    make = lambda: multimodal.MultimodalPreprocessor(
        {'video': _fixed(3, 5, 2.0), 'audio': _fixed(4, 2, 1.0)},
        min_padding_size=0, name='mm')
    (x, _), params = preprocessor_testing.run(make, self._inputs())
    assert x.shape == (2, 7, 5)
    assert set(params['mm']) == {'audio_padding'}

  def test_paper_padding_channels(self):
    """video 483 + min_padding_size 4 = 487; raw audio 257 + 230 padding."""
    make = lambda: multimodal.MultimodalPreprocessor(
        {'audio': audio_video.AudioPreprocessor(128, 64, 480),
         'video': audio_video.VideoPreprocessor((2, 8, 8), 16)},
        min_padding_size=4, name='mm')
    inputs = {'audio': jax.ShapeDtypeStruct((1, 61_440), jnp.float32),
              'video': jax.ShapeDtypeStruct((1, 32, 224, 224, 3),
                                            jnp.float32)}
    f = hk.transform(lambda x: make()(x, is_training=False))
    params = jax.eval_shape(lambda x: f.init(jax.random.key(0), x), inputs)
    assert params['mm']['audio_padding'].shape == (230,)
    assert params['mm']['video_padding'].shape == (4,)

  def test_mask(self):
    make = lambda: multimodal.MultimodalPreprocessor({
        'video': _fixed(3, 2, 2.0),
        'audio': _fixed(4, 2, 1.0, mask=[True, True, False, False])})
    (x, mask), _ = preprocessor_testing.run(make, self._inputs())
    assert x.shape[:2] == mask.shape == (2, 7) and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(
        mask, np.tile([True, True, False, False, True, True, True], (2, 1)))

  def test_modality_dropout(self):
    batch = 256
    make = lambda: multimodal.MultimodalPreprocessor(
        {'video': _fixed(3, 5, 2.0), 'audio': _fixed(4, 2, 1.0)},
        min_padding_size=1, modality_dropout={'video': 0.3}, name='mm')
    (x, _), params = preprocessor_testing.run(make, self._inputs(batch),
                                              is_training=True)
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
    (x2, _), _ = preprocessor_testing.run(make, self._inputs(batch),
                                          is_training=True, seed=5)
    assert not np.array_equal(dropped, np.all(x2[:, 4:, :5] == 0.0,
                                              axis=(1, 2)))

  def test_no_dropout_at_eval_and_needs_no_rng(self):
    make = lambda: multimodal.MultimodalPreprocessor(
        {'video': _fixed(3, 5, 2.0), 'audio': _fixed(4, 2, 1.0)},
        modality_dropout={'video': 1.0})
    f = hk.transform(lambda x, t: make()(x, is_training=t))
    params = f.init(jax.random.key(0), self._inputs(), False)
    x, _ = f.apply(params, None, self._inputs(), False)
    np.testing.assert_array_equal(x[:, 4:, :5], 2.0)
    x, _ = f.apply(params, jax.random.key(1), self._inputs(), True)
    np.testing.assert_array_equal(x[:, 4:, :5], 0.0)

  def test_output_shape(self):
    make = lambda: multimodal.MultimodalPreprocessor(
        {'spectrogram': audio_video.SpectrogramPreprocessor((1, 1), 2),
         'video': audio_video.VideoPreprocessor((2, 4, 4), 2)},
        min_padding_size=3)
    shape = preprocessor_testing.shape_of(
        make, {'spectrogram': (4, 3), 'video': (2, 8, 8, 3)})
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
      preprocessor_testing.run(
          lambda: multimodal.MultimodalPreprocessor(**kwargs),
          {'video': jnp.zeros((1, 1))})

  def test_bad_inputs(self):
    make = lambda: multimodal.MultimodalPreprocessor(
        {'video': _fixed(3, 5, 2.0), 'audio': _fixed(4, 2, 1.0)})
    with pytest.raises(ValueError, match=r"lack modalities \['audio'\]"):
      preprocessor_testing.run(make, {'video': jnp.zeros((1, 1))})
    with pytest.raises(ValueError, match='dict of inputs'):
      preprocessor_testing.run(make, jnp.zeros((1, 1)))
    with pytest.raises(ValueError, match='batch size'):
      preprocessor_testing.run(
          make, {'video': jnp.zeros((1, 1)), 'audio': jnp.zeros((2, 1))})
