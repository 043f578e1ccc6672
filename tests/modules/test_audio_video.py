"""Tests of the audio, spectrogram and video preprocessors."""

import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax.modules import audio_video
from tests.modules import preprocessor_testing


class TestPaperSizes:

  def test_raw_audio(self):
    shape = preprocessor_testing.shape_of(
        lambda: audio_video.AudioPreprocessor(
            samples_per_patch=128, num_freq_bands=64, max_resolution=480),
        (61_440,))
    assert shape == (2, 480, 128 + 129)

  def test_mel_spectrogram(self):
    shape = preprocessor_testing.shape_of(
        lambda: audio_video.SpectrogramPreprocessor(
            (1, 1), num_freq_bands=32, max_resolution=(96, 50)), (96, 50))
    assert shape == (2, 4_800, 1 + 2 * 65)

  def test_video(self):
    shape = preprocessor_testing.shape_of(
        lambda: audio_video.VideoPreprocessor((2, 8, 8), num_freq_bands=16),
        (32, 224, 224, 3), batch=1)
    assert shape == (1, 12_544, 483)


class TestAudioVideoPreprocessors:

  def test_audio_contents(self):
    audio = preprocessor_testing.uniform((2, 24))
    (x, mask), _ = preprocessor_testing.run(
        lambda: audio_video.AudioPreprocessor(
            samples_per_patch=4, num_freq_bands=3), audio)
    assert mask is None and x.shape == (2, 6, 4 + 7)
    np.testing.assert_array_equal(x[:, 2, :4], audio[:, 8:12])
    np.testing.assert_allclose(
        x[0, :, 4:], preprocessor_testing.grid_ff((6,), 3), atol=1e-6)

  def test_spectrogram_contents(self):
    spec = preprocessor_testing.uniform((2, 4, 6))
    (x, _), _ = preprocessor_testing.run(
        lambda: audio_video.SpectrogramPreprocessor(
            (2, 3), num_freq_bands=2, max_resolution=(8, 8)), spec)
    assert x.shape == (2, 2 * 2, 6 + 10)
    # Patch (time 1, freq 0), flattened time-major.
    np.testing.assert_array_equal(x[:, 2, :6], spec[:, 2:4, 0:3].reshape(2, 6))
    np.testing.assert_allclose(
        x[0, :, 6:], preprocessor_testing.grid_ff((2, 2), 2, (8, 8)),
        atol=1e-6)

  def test_video_contents(self):
    video = preprocessor_testing.uniform((2, 4, 8, 8, 3))
    (x, _), _ = preprocessor_testing.run(
        lambda: audio_video.VideoPreprocessor((2, 4, 4), num_freq_bands=2),
        video)
    assert x.shape == (2, 8, 2 * 4 * 4 * 3 + 3 * 5)
    # Patch (t 1, y 0, x 1) is input 1*4 + 0*2 + 1, flattened (t, y, x, c).
    np.testing.assert_array_equal(
        x[:, 5, :96], video[:, 2:4, 0:4, 4:8, :].reshape(2, 96))
    np.testing.assert_allclose(
        x[0, :, 96:], preprocessor_testing.grid_ff((2, 2, 2), 2), atol=1e-6)

  @pytest.mark.parametrize('make, shape, match', [
      (lambda: audio_video.AudioPreprocessor(5), (2, 24), r'\(5,\)'),
      (lambda: audio_video.AudioPreprocessor(0), (2, 24),
       'samples_per_patch'),
      (lambda: audio_video.AudioPreprocessor(4), (2, 24, 1),
       'AudioPreprocessor input'),
      (lambda: audio_video.AudioPreprocessor(4, max_resolution=(3, 3)),
       (2, 24), 'max_resolution'),
      (lambda: audio_video.SpectrogramPreprocessor((2,)), (2, 4, 4),
       'patch_shape'),
      (lambda: audio_video.SpectrogramPreprocessor((3, 1)), (2, 4, 4),
       'does not divide'),
      (lambda: audio_video.VideoPreprocessor((2, 8)), (1, 2, 8, 8, 3),
       'patch_shape'),
      (lambda: audio_video.VideoPreprocessor((2, 8, 8)), (1, 3, 8, 8, 3),
       r'\(3, 8, 8\)'),
      (lambda: audio_video.VideoPreprocessor(num_freq_bands=0),
       (1, 2, 8, 8, 3), 'num_freq_bands'),
  ])
  def test_errors(self, make, shape, match):
    with pytest.raises(ValueError, match=match):
      preprocessor_testing.run(make, preprocessor_testing.uniform(shape))

  def test_integer_inputs_rejected(self):
    with pytest.raises(ValueError, match='floating-point inputs.*uint8'):
      preprocessor_testing.run(
          lambda: audio_video.VideoPreprocessor((1, 2, 2), 2),
          jnp.zeros((1, 2, 4, 4, 3), jnp.uint8))


@pytest.mark.parametrize('make, shape', [
    (lambda s: audio_video.AudioPreprocessor(
        samples_per_patch=4, num_freq_bands=5, split_positions=s), (32,)),
    (lambda s: audio_video.SpectrogramPreprocessor(
        num_freq_bands=2, split_positions=s), (6, 5)),
    (lambda s: audio_video.VideoPreprocessor(
        patch_shape=(1, 2, 2), num_freq_bands=2, split_positions=s),
     (2, 4, 4, 3)),
])
def test_split_positions_hold_the_same_byte_array(make, shape):
  preprocessor_testing.check_split_positions(make, shape)
