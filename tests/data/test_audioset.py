"""Tests for perceiver_jax.data.audioset and scripts/prepare_audioset.py.

Runs on the real audio-visual fixture in tests/testdata/audioset (built by
scripts/make_audioset_fixture.py): spoken digit words + moving handwritten
digits, 4 classes, CSVs in the official format.
"""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from perceiver_jax.data import audioset
from scripts import prepare_audioset

pytest.importorskip('av')

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                       'testdata', 'audioset')
CLIPS = os.path.join(FIXTURE, 'clips')
MISSING_YTID = 'PIFG8JIFmOn'  # eval row without a clip on disk.
AUDIO_ONLY_YTID = 'PozrROqE3LS'  # unbalanced_train .flac clip.
SHORT_YTID = 'z3z6pQqzP_B'  # balanced_train clip of 8 s.
STORED_SIZE = 32


@pytest.fixture(scope='module')
def classes():
  return audioset.read_classes(os.path.join(FIXTURE, audioset.CLASS_CSV))


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """Fixture clips -> TFRecords via the script's entry point (once)."""
  out = str(tmp_path_factory.mktemp('audioset_tfrecords'))
  summary = prepare_audioset.main([
      f'--csv_dir={FIXTURE}', f'--clip_dir={CLIPS}', f'--output_dir={out}',
      '--splits=balanced_train,eval,unbalanced_train',
      f'--video_size={STORED_SIZE}', '--examples_per_shard=3'])
  return out, summary


def _config(data_dir, **kwargs):
  config = audioset.default_config()
  config.data_dir = data_dir
  config.csv_dir = FIXTURE
  config.video_size = STORED_SIZE
  config.update(kwargs)
  return config


def _write(path, text):
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  return path


# CSV parsing.


def test_read_classes(classes):
  assert classes.num_classes == 4
  assert classes.mids == ('/m/fx000', '/m/fx001', '/m/fx002', '/m/fx003')
  assert classes.display_names == ('zero', 'one', 'two', 'three')


def test_read_classes_quoted_names_and_errors(tmp_path):
  path = _write(tmp_path / 'c.csv', 'index,mid,display_name\n'
                '0,/m/09x0r,"Speech"\n'
                '1,/m/05zppz,"Male speech, man speaking"\n')
  table = audioset.read_classes(str(path))
  assert table.display_names == ('Speech', 'Male speech, man speaking')
  _write(path, 'idx,mid,name\n0,/m/a,"A"\n')
  with pytest.raises(ValueError, match='header'):
    audioset.read_classes(str(path))
  _write(path, 'index,mid,display_name\n0,/m/a,"A"\n2,/m/b,"B"\n')
  with pytest.raises(ValueError, match='0..n-1'):
    audioset.read_classes(str(path))
  with pytest.raises(FileNotFoundError, match='nope.csv'):
    audioset.read_classes(str(tmp_path / 'nope.csv'))


def test_read_segments_fixture(classes):
  rows = {s: audioset.read_segments(
      os.path.join(FIXTURE, audioset.SEGMENT_CSVS[s]), classes)
          for s in audioset.SPLITS}
  assert {s: len(r) for s, r in rows.items()} == {
      'balanced_train': 8, 'eval': 7, 'unbalanced_train': 4}
  first = rows['balanced_train'][0]
  # Three '#' lines come first, so the first row is line 4.
  assert (first.ytid, first.start, first.end, first.labels, first.line) == (
      '-wf8qlhUmol', '0.000', '10.000', (0,), 4)
  multi = [r for r in rows['balanced_train'] if len(r.labels) == 2]
  assert [r.labels for r in multi] == [(0, 2), (1, 3)]
  assert all(r.end_seconds - r.start_seconds == 10 for v in rows.values()
             for r in v)


def test_read_segments_quoting_spaces_and_unknown_label(tmp_path, classes):
  header = '# a\n# b\n# YTID, start_seconds, end_seconds, positive_labels\n'
  path = _write(tmp_path / 's.csv', header +
                'abc_-DEF123, 30.000, 40.000, "/m/fx003,/m/fx001"\n\n'
                'xyz, 1.5, 11.5, "/m/fx002"\n')
  rows = audioset.read_segments(str(path), classes)
  assert [(r.ytid, r.labels, r.line) for r in rows] == [
      ('abc_-DEF123', (1, 3), 4), ('xyz', (2,), 6)]
  _write(path, header + 'abc, 0.000, 10.000, "/m/fx001"\n'
         'def, 0.000, 10.000, "/m/fx001,/m/zzz"\n')
  with pytest.raises(ValueError, match=r"s\.csv:5: unknown label id '/m/zzz'"):
    audioset.read_segments(str(path), classes)
  _write(path, header + 'abc, 0.000, "/m/fx001"\n')
  with pytest.raises(ValueError, match=':4: expected 4 fields'):
    audioset.read_segments(str(path), classes)
  _write(path, header + 'abc, ten, 20.0, "/m/fx001"\n')
  with pytest.raises(ValueError, match=":4: bad start/end seconds 'ten'"):
    audioset.read_segments(str(path), classes)


# Finding and decoding clips.


def test_find_clips_reports_missing_and_name_variants(tmp_path, classes):
  segs = audioset.read_segments(os.path.join(FIXTURE, 'eval_segments.csv'),
                                classes)
  found, missing = audioset.find_clips(segs, audioset.index_clip_dir(CLIPS))
  assert [s.ytid for s in missing] == [MISSING_YTID]
  assert len(found) == 6
  names = {s.ytid: os.path.basename(p) for s, p in found}
  assert names['s6o7YTBx7CT'] == 's6o7YTBx7CT_60.000.mkv'
  assert names['cVtILMfX4ON'] == 'cVtILMfX4ON.mp4'
  # Integer-start names, nested folders and extension priority.
  nested = tmp_path / 'a' / 'b'
  nested.mkdir(parents=True)
  (nested / 'cVtILMfX4ON_130.wav').write_bytes(b'')
  (nested / 'cVtILMfX4ON_130.mkv').write_bytes(b'')
  (nested / 'notes.txt').write_bytes(b'')
  found, missing = audioset.find_clips(
      segs[:1], audioset.index_clip_dir(str(tmp_path)))
  assert [os.path.basename(p) for _, p in found] == ['cVtILMfX4ON_130.mkv']
  with pytest.raises(FileNotFoundError, match='no_such_dir'):
    audioset.index_clip_dir(str(tmp_path / 'no_such_dir'))


def test_decode_clip_rates_and_lengths():
  clip = audioset.decode_clip(os.path.join(CLIPS, 'cVtILMfX4ON.mp4'),
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
  slow = audioset.decode_clip(os.path.join(CLIPS, 'cVtILMfX4ON.mp4'),
                              sample_rate=16_000, fps=10, video_size=None)
  assert slow.video.shape == (100, 64, 64, 3)
  assert abs(slow.audio.shape[0] - 160_000) < 1024
  np.testing.assert_array_equal(
      slow.video[10], audioset.decode_clip(
          os.path.join(CLIPS, 'cVtILMfX4ON.mp4'), video_size=None).video[25])


def test_decode_short_audio_only_and_corrupt(tmp_path):
  short = audioset.decode_clip(os.path.join(CLIPS, SHORT_YTID + '.mp4'),
                               video_size=16)
  assert short.video.shape == (200, 16, 16, 3)
  assert abs(short.audio.shape[0] - 384_000) < 2048
  flac = audioset.decode_clip(os.path.join(CLIPS, AUDIO_ONLY_YTID + '.flac'))
  assert flac.video is None and flac.audio.shape == (480_000,)
  bad = _write(tmp_path / 'bad.mp4', 'not a video')
  with pytest.raises(ValueError, match='bad.mp4'):
    audioset.decode_clip(str(bad))


# Preparation.


def test_prepare_summary_counts_missing_unusable_and_padded(prepared):
  out, summary = prepared
  s = summary['splits']
  assert {k: (v['rows'], v['found'], v['missing'], v['unusable'],
              v['written']) for k, v in s.items()} == {
                  'balanced_train': (8, 8, 0, 0, 8),
                  'eval': (7, 6, 1, 0, 6),
                  'unbalanced_train': (4, 4, 0, 1, 3)}
  assert s['eval']['missing_ytids'] == [MISSING_YTID]
  assert s['unbalanced_train']['unusable_ytids'] == [AUDIO_ONLY_YTID]
  assert s['balanced_train']['padded'] == 1
  assert len(s['balanced_train']['files']) == 3  # 3 + 3 + 2 records.
  with open(os.path.join(out, 'eval-missing.txt')) as f:
    assert f.read() == f'{MISSING_YTID},170.000,180.000\n'
  meta = audioset.read_metadata(out)
  assert meta['clip_samples'] == 480_000 and meta['clip_frames'] == 250
  assert meta['splits']['eval']['written'] == 6
  assert audioset.num_examples('eval', _config(out)) == 6
  assert audioset.num_classes(_config(out)) == 4


def test_prepare_prints_json_and_rejects_other_settings(prepared, capsys,
                                                        tmp_path):
  out = str(tmp_path / 'audio_only')
  summary = prepare_audioset.main([
      f'--csv_dir={FIXTURE}', f'--clip_dir={CLIPS}', f'--output_dir={out}',
      '--splits=unbalanced_train', '--modalities=audio',
      '--audio_dtype=float32'])
  printed = json.loads(capsys.readouterr().out)
  assert printed == json.loads(json.dumps(summary))
  # Audio only: the .flac clip is usable.
  assert printed['splits']['unbalanced_train']['written'] == 4
  with pytest.raises(ValueError, match='other settings'):
    prepare_audioset.prepare(csv_dir=FIXTURE, clip_dir=CLIPS, output_dir=out,
                             splits=['eval'], video_size=STORED_SIZE)
  with pytest.raises(ValueError, match="'test'"):
    prepare_audioset.prepare(csv_dir=FIXTURE, clip_dir=CLIPS, output_dir=out,
                             splits=['test'])
  # This store holds no video, so a video loader refuses it.
  with pytest.raises(ValueError, match='hold only'):
    audioset.load(_config(out, modality='video', csv_dir=''),
                  'unbalanced_train', is_training=False, batch_dims=(1, 1),
                  seed=0)


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
  config = _config(prepared[0], modality=modality,
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
  config = _config(prepared[0], modality=modality,
                   audio_representation=representation)
  batches = list(audioset.load(config, 'eval', is_training=False,
                               batch_dims=(2, 4), seed=0))
  assert len(batches) == 1  # 6 clips, one padded batch of 8.
  (batch,) = batches
  assert {k: v.shape for k, v in batch['inputs'].items()} == (
      _expected_inputs(modality, representation, (2, 4, 16)))
  np.testing.assert_array_equal(batch['mask'].ravel(), [1] * 6 + [0] * 2)
  # Labels in CSV order, the missing clip's row absent.
  rows = [r for r in audioset.read_segments(
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
  config = _config(prepared[0], modality='audio_video')
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
  clip = audioset.decode_clip(os.path.join(CLIPS, 'cVtILMfX4ON.mp4'),
                              video_size=STORED_SIZE)
  np.testing.assert_allclose(wave, clip.audio[:480_000], atol=2 ** -15)
  assert np.abs(frames * 255 - clip.video).mean() < 3  # JPEG at quality 90.


def test_training_audio_and_video_windows_align(tmp_path):
  """Synthetic shards whose samples and pixels encode their frame index."""
  clip_frames, size = 60, 4
  frame_of_sample = np.arange(clip_frames * 1920) // 1920
  meta = dict(
      format_version=audioset.FORMAT_VERSION, modalities=['audio', 'video'],
      classes=[dict(index=0, mid='/m/a', display_name='a')],
      sample_rate=48_000, fps=25, clip_seconds=2.4,
      clip_samples=clip_frames * 1920, clip_frames=clip_frames,
      video_size=size, video_format='uint8', audio_dtype='float32',
      splits={'balanced_train': dict(written=1, rows=1, missing=0,
                                     files=['balanced_train-00000.tfrecord'])})
  with open(tmp_path / audioset.METADATA_FILE, 'w') as f:
    json.dump(meta, f)
  video = np.broadcast_to(np.arange(clip_frames, dtype=np.uint8)[:, None,
                                                                None, None],
                          [clip_frames, size, size, 3])
  with tf.io.TFRecordWriter(str(tmp_path / 'balanced_train-00000.tfrecord')
                            ) as w:
    w.write(audioset.serialize_example(
        ytid='x', start_seconds=0.0, labels=[0],
        audio=frame_of_sample / 1000.0, video=np.ascontiguousarray(video),
        audio_dtype='float32', video_format='uint8'))
  config = _config(str(tmp_path), csv_dir='', video_size=size)
  batch = next(audioset.load(config, 'balanced_train', is_training=True,
                             batch_dims=(4, 2), seed=3))
  audio = batch['inputs']['audio'].reshape(8, 61_440)
  first_frame = batch['inputs']['video'].reshape(8, 32, -1)[:, :, 0] * 255
  for a, v in zip(audio, first_frame):
    np.testing.assert_allclose(v, v[0] + np.arange(32), atol=1e-3)
    np.testing.assert_allclose(a * 1000, np.repeat(v, 1920), atol=1e-3)
  assert len(np.unique(first_frame[:, 0])) > 1  # Random window starts.


def test_training_is_seeded(prepared):
  config = _config(prepared[0], modality='audio_video',
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
  config = _config(prepared[0], modality='video', video_size=16)
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


# Spectrogram and SpecAugment.


def test_log_mel_shape_is_4800_and_peaks_at_tone():
  config = audioset.default_config()
  assert audioset.spectrogram_shape(config) == (96, 50)
  assert np.prod(audioset.spectrogram_shape(config)) == 4_800
  t = np.arange(61_440) / 48_000
  tones = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 6000 * t)])
  spec = audioset.log_mel_spectrogram(tf.constant(tones, tf.float32),
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
  eager = audioset.spec_augment(spec, seed, config).numpy()
  in_pipeline = next(iter(tf.data.Dataset.from_tensors((spec, seed)).map(
      lambda s, sd: audioset.spec_augment(s, sd, config)))).numpy()
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
      audioset.spec_augment(spec, seed, config).numpy(), spec.numpy())


# Validation.


def test_bad_config_and_split_raise(prepared, tmp_path):
  out = prepared[0]
  def load(config, split='eval'):
    return audioset.load(config, split, is_training=False, batch_dims=(1, 1),
                         seed=0)
  with pytest.raises(ValueError, match="'speech'"):
    load(_config(out, modality='speech'))
  with pytest.raises(ValueError, match="'test'"):
    load(_config(out), 'test')
  with pytest.raises(ValueError, match='num_frames=16'):
    load(_config(out, num_frames=16))
  with pytest.raises(ValueError, match='sample_rate=16000'):
    load(_config(out, sample_rate=16_000, window_seconds=1.28))
  with pytest.raises(FileNotFoundError, match='prepare_audioset'):
    load(_config(str(tmp_path)))
  partial = tmp_path / 'partial'
  shutil.copytree(out, partial)
  meta = audioset.read_metadata(str(partial))
  del meta['splits']['eval']
  _write(partial / audioset.METADATA_FILE, json.dumps(meta))
  with pytest.raises(ValueError, match="split 'eval' was not prepared"):
    load(_config(str(partial)))
  other = tmp_path / 'other_csvs'
  other.mkdir()
  _write(other / audioset.CLASS_CSV, 'index,mid,display_name\n0,/m/x,"x"\n')
  with pytest.raises(ValueError, match='class list'):
    load(_config(out, csv_dir=str(other)))
