"""Tests for perceiver_jax.data.audioset (the loader).

Loads shards that scripts/prepare_audioset.py writes from the real
audio-visual fixture in tests/testdata/audioset (see
tests/data/audioset_fixture.py), plus synthetic shards whose samples and
pixels encode their position.
"""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from perceiver_jax.data import audio_ops
from perceiver_jax.data import audioset
from perceiver_jax.data import audioset_prepare
from tests.data import audioset_fixture

pytest.importorskip('av')

FIXTURE = audioset_fixture.FIXTURE
CLIPS = audioset_fixture.CLIPS
MISSING_YTID = audioset_fixture.MISSING_YTID
STORED_SIZE = audioset_fixture.STORED_SIZE
classes = audioset_fixture.classes
prepared = audioset_fixture.prepared


# Loading.

PRESETS = [('audio', 'raw'), ('audio', 'mel'), ('video', 'raw'),
           ('audio_video', 'raw'), ('audio_video', 'mel')]


def _expected_inputs(modality, representation, lead):
  shapes = {}
  if modality != 'video':
    if representation == 'raw':
      shapes['audio'] = lead + (61_440,)
    else:
      shapes['spectrogram'] = lead + (96, 50)
  if modality != 'audio':
    shapes['video'] = lead + (32, STORED_SIZE, STORED_SIZE, 3)
  return shapes


@pytest.mark.parametrize('modality,representation', PRESETS)
def test_training_batch_shapes(prepared, modality, representation):
  config = audioset_fixture.config(prepared[0], modality=modality,
                                   audio_representation=representation)
  batch = next(audioset.load(config, 'balanced_train', is_training=True,
                             batch_dims=(8, 1), seed=0))
  assert {k: v.shape for k, v in batch['inputs'].items()} == (
      _expected_inputs(modality, representation, (8, 1)))
  assert all(v.dtype == np.float32 for v in batch['inputs'].values())
  assert batch['labels'].shape == (8, 1, 4)
  assert batch['labels'].dtype == np.float32
  assert set(np.unique(batch['labels'])) <= {0.0, 1.0}
  assert np.all(batch['labels'].sum(-1) >= 1)
  np.testing.assert_array_equal(batch['mask'], np.ones([8, 1]))
  if 'video' in batch['inputs']:
    video = batch['inputs']['video']
    assert 0.0 <= video.min() and video.max() <= 1.0 and video.max() > 0.3
  if 'audio' in batch['inputs']:
    assert 0.05 < np.abs(batch['inputs']['audio']).max() <= 1.0


@pytest.mark.parametrize('modality,representation', PRESETS)
def test_eval_batch_has_windows_axis_and_padding(prepared, modality,
                                                 representation, classes):
  config = audioset_fixture.config(prepared[0], modality=modality,
                                   audio_representation=representation)
  batches = list(audioset.load(config, 'eval', is_training=False,
                               batch_dims=(2, 4), seed=0))
  assert len(batches) == 1  # 6 clips, one padded batch of 8.
  (batch,) = batches
  assert {k: v.shape for k, v in batch['inputs'].items()} == (
      _expected_inputs(modality, representation, (2, 4, 16)))
  np.testing.assert_array_equal(batch['mask'].ravel(), [1] * 6 + [0] * 2)
  # Labels in CSV order, the missing clip's row absent.
  rows = [r for r in audioset_prepare.read_segments(
      os.path.join(FIXTURE, 'eval_segments.csv'), classes)
          if r.ytid != MISSING_YTID]
  expected = np.zeros([8, 4], np.float32)
  for i, r in enumerate(rows):
    expected[i, list(r.labels)] = 1
  np.testing.assert_array_equal(batch['labels'].reshape(8, 4), expected)


def test_eval_window_starts_cover_clip_with_overlap():
  starts = audioset.eval_window_starts(250, 32, 16)
  assert len(starts) == 16 and starts[0] == 0 and starts[-1] + 32 == 250
  assert np.all(np.diff(starts) > 0) and np.all(np.diff(starts) < 32)
  with pytest.raises(ValueError, match='shorter'):
    audioset.eval_window_starts(20, 32, 16)


def test_eval_windows_are_aligned_slices_of_the_clip(prepared):
  config = audioset_fixture.config(prepared[0], modality='audio_video')
  batch = next(audioset.load(config, 'eval', is_training=False,
                             batch_dims=(1, 8), seed=0))
  audio = batch['inputs']['audio'][0, 0]  # [16, 61440], first clip.
  video = batch['inputs']['video'][0, 0]  # [16, 32, S, S, 3]
  starts = audioset.eval_window_starts(250, 32, 16)
  # Reassemble the whole clip from the windows; overlaps must agree.
  wave = np.full([480_000], np.nan, np.float32)
  frames = np.full([250, STORED_SIZE, STORED_SIZE, 3], np.nan, np.float32)
  for k, f0 in enumerate(starts):
    seg = slice(f0 * 1920, f0 * 1920 + 61_440)
    known = ~np.isnan(wave[seg])
    np.testing.assert_array_equal(wave[seg][known], audio[k][known])
    wave[seg] = audio[k]
    known = ~np.isnan(frames[f0:f0 + 32])
    np.testing.assert_array_equal(frames[f0:f0 + 32][known], video[k][known])
    frames[f0:f0 + 32] = video[k]
  assert not np.isnan(wave).any() and not np.isnan(frames).any()
  # Same clip decoded directly (int16 storage: error <= 1/65536).
  clip = audio_ops.decode_clip(os.path.join(CLIPS, 'cVtILMfX4ON.mp4'),
                               video_size=STORED_SIZE)
  np.testing.assert_allclose(wave, clip.audio[:480_000], atol=2 ** -15)
  assert np.abs(frames * 255 - clip.video).mean() < 3  # JPEG at quality 90.


def test_training_audio_and_video_windows_align(tmp_path):
  """Synthetic shards whose samples and pixels encode their frame index."""
  clip_frames, size = 60, 4
  frame_of_sample = np.arange(clip_frames * 1920) // 1920
  meta = dict(
      format_version=audioset_prepare.FORMAT_VERSION,
      modalities=['audio', 'video'],
      classes=[dict(index=0, mid='/m/a', display_name='a')],
      sample_rate=48_000, fps=25, clip_seconds=2.4,
      clip_samples=clip_frames * 1920, clip_frames=clip_frames,
      video_size=size, video_format='uint8', audio_dtype='float32',
      splits={'balanced_train': dict(written=1, rows=1, missing=0,
                                     files=['balanced_train-00000.tfrecord'])})
  with open(tmp_path / audioset_prepare.METADATA_FILE, 'w') as f:
    json.dump(meta, f)
  video = np.broadcast_to(np.arange(clip_frames, dtype=np.uint8)[:, None,
                                                                None, None],
                          [clip_frames, size, size, 3])
  with tf.io.TFRecordWriter(str(tmp_path / 'balanced_train-00000.tfrecord')
                            ) as w:
    w.write(audioset_prepare.serialize_example(
        ytid='x', start_seconds=0.0, labels=[0],
        audio=frame_of_sample / 1000.0, video=np.ascontiguousarray(video),
        audio_dtype='float32', video_format='uint8'))
  config = audioset_fixture.config(str(tmp_path), csv_dir='', video_size=size)
  batch = next(audioset.load(config, 'balanced_train', is_training=True,
                             batch_dims=(4, 2), seed=3))
  audio = batch['inputs']['audio'].reshape(8, 61_440)
  first_frame = batch['inputs']['video'].reshape(8, 32, -1)[:, :, 0] * 255
  for a, v in zip(audio, first_frame):
    np.testing.assert_allclose(v, v[0] + np.arange(32), atol=1e-3)
    np.testing.assert_allclose(a * 1000, np.repeat(v, 1920), atol=1e-3)
  assert len(np.unique(first_frame[:, 0])) > 1  # Random window starts.


def test_training_is_seeded(prepared):
  config = audioset_fixture.config(prepared[0], modality='audio_video',
                                   audio_representation='mel')
  def first(seed):
    return next(audioset.load(config, 'balanced_train', is_training=True,
                              batch_dims=(2, 2), seed=seed))
  a, b, c = first(1), first(1), first(2)
  np.testing.assert_array_equal(a['inputs']['spectrogram'],
                                b['inputs']['spectrogram'])
  np.testing.assert_array_equal(a['inputs']['video'], b['inputs']['video'])
  assert not np.array_equal(a['inputs']['video'], c['inputs']['video'])


def test_video_resized_to_config_size(prepared):
  config = audioset_fixture.config(prepared[0], modality='video',
                                   video_size=16)
  batch = next(audioset.load(config, 'eval', is_training=False,
                             batch_dims=(8, 1), seed=0))
  assert batch['inputs']['video'].shape == (8, 1, 16, 32, 16, 16, 3)


def test_host_sharding_partitions_records(prepared):
  out, summary = prepared
  files = [os.path.join(out, f)
           for f in summary['splits']['balanced_train']['files']]  # 3 files.
  def ytids(index, count):
    ds = audioset._host_records(files, index, count, shuffle=False, seed=0)
    return [tf.train.Example.FromString(r.numpy()).features.feature['ytid']
            .bytes_list.value[0] for r in ds]
  everything = ytids(0, 1)
  assert len(everything) == 8
  for count in (2, 4):  # Whole files per host; then records per host.
    shares = [ytids(i, count) for i in range(count)]
    assert sorted(sum(shares, [])) == sorted(everything)
    assert all(shares)


# Validation.


def test_bad_config_and_split_raise(prepared, tmp_path):
  out = prepared[0]
  def load(config, split='eval'):
    return audioset.load(config, split, is_training=False, batch_dims=(1, 1),
                         seed=0)
  with pytest.raises(ValueError, match="'speech'"):
    load(audioset_fixture.config(out, modality='speech'))
  with pytest.raises(ValueError, match="'test'"):
    load(audioset_fixture.config(out), 'test')
  with pytest.raises(ValueError, match='num_frames=16'):
    load(audioset_fixture.config(out, num_frames=16))
  with pytest.raises(ValueError, match='sample_rate=16000'):
    load(audioset_fixture.config(out, sample_rate=16_000,
                                 window_seconds=1.28))
  with pytest.raises(FileNotFoundError, match='prepare_audioset'):
    load(audioset_fixture.config(str(tmp_path)))
  partial = tmp_path / 'partial'
  shutil.copytree(out, partial)
  meta = audioset.read_metadata(str(partial))
  del meta['splits']['eval']
  audioset_fixture.write(partial / audioset_prepare.METADATA_FILE,
                         json.dumps(meta))
  with pytest.raises(ValueError, match="split 'eval' was not prepared"):
    load(audioset_fixture.config(str(partial)))
  other = tmp_path / 'other_csvs'
  other.mkdir()
  audioset_fixture.write(other / audioset_prepare.CLASS_CSV,
                         'index,mid,display_name\n0,/m/x,"x"\n')
  with pytest.raises(ValueError, match='class list'):
    load(audioset_fixture.config(out, csv_dir=str(other)))


@pytest.mark.parametrize('damage, is_training, match', [
    ('truncate', True, 'Truncated TFRecord file'),
    ('flip', False, 'is corrupt'),
])
def test_damaged_shard_is_named(prepared, tmp_path, damage, is_training,
                                match):
  """Issue 27: tf.data's DataLossError names no file; ours does."""
  data_dir = str(tmp_path / 'shards')
  shutil.copytree(prepared[0], data_dir)
  shard = os.path.join(data_dir, 'eval-00000.tfrecord')
  data = bytearray(open(shard, 'rb').read())
  if damage == 'truncate':
    data = data[:len(data) - 100]
  else:
    data[len(data) // 2] ^= 0xff  # Inside a record: its CRC fails.
  with open(shard, 'wb') as f:
    f.write(bytes(data))
  config = audioset_fixture.config(data_dir, modality='audio')
  with pytest.raises(ValueError, match=match) as info:
    for _ in audioset.load(config, 'eval', is_training=is_training,
                           batch_dims=(1, 2), seed=0):
      pass
  assert shard in str(info.value)
