"""Tests for perceiver_jax.data.audio_ops.

Decodes the real audio-visual clips of tests/testdata/audioset (see
tests/data/audioset_fixture.py) and checks the log-mel and SpecAugment ops
eagerly and inside tf.data.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from perceiver_jax.data import audio_ops
from perceiver_jax.data import audioset
from tests.data import audioset_fixture

pytest.importorskip('av')

CLIPS = audioset_fixture.CLIPS
AUDIO_ONLY_YTID = audioset_fixture.AUDIO_ONLY_YTID
SHORT_YTID = audioset_fixture.SHORT_YTID
STORED_SIZE = audioset_fixture.STORED_SIZE


# Decoding clips.


def test_decode_clip_rates_and_lengths():
  clip = audio_ops.decode_clip(os.path.join(CLIPS, 'cVtILMfX4ON.mp4'),
                               video_size=STORED_SIZE)
  assert clip.sample_rate == 48_000
  # 10 s of audio (AAC may add < 1 frame of padding at the end).
  assert 480_000 <= clip.audio.shape[0] < 480_000 + 2048
  assert clip.audio.dtype == np.float32 and 0.1 < np.abs(clip.audio).max() <= 1
  assert clip.video.shape == (250, STORED_SIZE, STORED_SIZE, 3)
  assert clip.video.dtype == np.uint8 and clip.video.max() > 100
  # The digit moves: frames differ over time.
  assert np.abs(clip.video[0].astype(int) - clip.video[100]).mean() > 1
  # Resampled frame rate and native resolution.
  slow = audio_ops.decode_clip(os.path.join(CLIPS, 'cVtILMfX4ON.mp4'),
                               sample_rate=16_000, fps=10, video_size=None)
  assert slow.video.shape == (100, 64, 64, 3)
  assert abs(slow.audio.shape[0] - 160_000) < 1024
  np.testing.assert_array_equal(
      slow.video[10], audio_ops.decode_clip(
          os.path.join(CLIPS, 'cVtILMfX4ON.mp4'), video_size=None).video[25])


def test_decode_short_audio_only_and_corrupt(tmp_path):
  short = audio_ops.decode_clip(os.path.join(CLIPS, SHORT_YTID + '.mp4'),
                                video_size=16)
  assert short.video.shape == (200, 16, 16, 3)
  assert abs(short.audio.shape[0] - 384_000) < 2048
  flac = audio_ops.decode_clip(os.path.join(CLIPS, AUDIO_ONLY_YTID + '.flac'))
  assert flac.video is None and flac.audio.shape == (480_000,)
  bad = audioset_fixture.write(tmp_path / 'bad.mp4', 'not a video')
  with pytest.raises(ValueError, match='bad.mp4'):
    audio_ops.decode_clip(str(bad))


# Spectrogram and SpecAugment.


def test_log_mel_shape_is_4800_and_peaks_at_tone():
  config = audioset.default_config()
  assert audioset.spectrogram_shape(config) == (96, 50)
  assert np.prod(audioset.spectrogram_shape(config)) == 4_800
  t = np.arange(61_440) / 48_000
  tones = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 6000 * t)])
  spec = audio_ops.log_mel_spectrogram(tf.constant(tones, tf.float32),
                                       config).numpy()
  assert spec.shape == (2, 96, 50)
  peak = spec[:, 48].argmax(-1)
  assert peak[0] < peak[1]  # Higher tone, higher mel bin.
  edges = np.linspace(_mel(20.0), _mel(24_000.0), 52)
  for p, f in zip(peak, (440, 6000)):
    assert edges[p] <= _mel(f) <= edges[p + 2]


def _mel(hz):
  return 1127.0 * np.log1p(hz / 700.0)


def test_spec_augment_masks_bands_with_mean():
  config = audioset.default_config()
  spec = tf.constant(np.random.default_rng(0).normal(size=[96, 50]) + 5,
                     tf.float32)
  seed = tf.constant([4, 2], tf.int64)
  eager = audio_ops.spec_augment(spec, seed, config).numpy()
  in_pipeline = next(iter(tf.data.Dataset.from_tensors((spec, seed)).map(
      lambda s, sd: audio_ops.spec_augment(s, sd, config)))).numpy()
  np.testing.assert_array_equal(eager, in_pipeline)
  changed = eager != spec.numpy()
  np.testing.assert_allclose(eager[changed], spec.numpy().mean(), rtol=1e-6)
  cols = changed.all(axis=0)
  rows = changed.all(axis=1)
  assert 0 < cols.sum() <= 2 * 8 and 0 < rows.sum() <= 2 * 16
  # Every changed cell lies in a fully masked row or column.
  np.testing.assert_array_equal(changed, cols[None, :] | rows[:, None])
  config.specaugment_max_freq_bins = config.specaugment_max_time_frames = 0
  np.testing.assert_array_equal(
      audio_ops.spec_augment(spec, seed, config).numpy(), spec.numpy())
