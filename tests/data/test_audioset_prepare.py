"""Tests for perceiver_jax.data.audioset_prepare and prepare_audioset.py.

Runs on the real audio-visual fixture in tests/testdata/audioset (see
tests/data/audioset_fixture.py): CSVs in the official format, clips under
several file names, one row without a clip and one audio-only clip.
"""

import json
import os

import pytest

from perceiver_jax.data import audioset
from perceiver_jax.data import audioset_prepare
from scripts import prepare_audioset
from tests.data import audioset_fixture

pytest.importorskip('av')

FIXTURE = audioset_fixture.FIXTURE
CLIPS = audioset_fixture.CLIPS
MISSING_YTID = audioset_fixture.MISSING_YTID
AUDIO_ONLY_YTID = audioset_fixture.AUDIO_ONLY_YTID
STORED_SIZE = audioset_fixture.STORED_SIZE
classes = audioset_fixture.classes
prepared = audioset_fixture.prepared


# CSV parsing.


def test_read_classes(classes):
  assert classes.num_classes == 4
  assert classes.mids == ('/m/fx000', '/m/fx001', '/m/fx002', '/m/fx003')
  assert classes.display_names == ('zero', 'one', 'two', 'three')


def test_read_classes_quoted_names_and_errors(tmp_path):
  path = audioset_fixture.write(tmp_path / 'c.csv',
                                'index,mid,display_name\n'
                                '0,/m/09x0r,"Speech"\n'
                                '1,/m/05zppz,"Male speech, man speaking"\n')
  table = audioset_prepare.read_classes(str(path))
  assert table.display_names == ('Speech', 'Male speech, man speaking')
  audioset_fixture.write(path, 'idx,mid,name\n0,/m/a,"A"\n')
  with pytest.raises(ValueError, match='header'):
    audioset_prepare.read_classes(str(path))
  audioset_fixture.write(
      path, 'index,mid,display_name\n0,/m/a,"A"\n2,/m/b,"B"\n')
  with pytest.raises(ValueError, match='0..n-1'):
    audioset_prepare.read_classes(str(path))
  with pytest.raises(FileNotFoundError, match='nope.csv'):
    audioset_prepare.read_classes(str(tmp_path / 'nope.csv'))


def test_read_segments_fixture(classes):
  rows = {s: audioset_prepare.read_segments(
      os.path.join(FIXTURE, audioset_prepare.SEGMENT_CSVS[s]), classes)
          for s in audioset_prepare.SPLITS}
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
  path = audioset_fixture.write(
      tmp_path / 's.csv', header +
      'abc_-DEF123, 30.000, 40.000, "/m/fx003,/m/fx001"\n\n'
      'xyz, 1.5, 11.5, "/m/fx002"\n')
  rows = audioset_prepare.read_segments(str(path), classes)
  assert [(r.ytid, r.labels, r.line) for r in rows] == [
      ('abc_-DEF123', (1, 3), 4), ('xyz', (2,), 6)]
  audioset_fixture.write(path, header + 'abc, 0.000, 10.000, "/m/fx001"\n'
                         'def, 0.000, 10.000, "/m/fx001,/m/zzz"\n')
  with pytest.raises(ValueError, match=r"s\.csv:5: unknown label id '/m/zzz'"):
    audioset_prepare.read_segments(str(path), classes)
  audioset_fixture.write(path, header + 'abc, 0.000, "/m/fx001"\n')
  with pytest.raises(ValueError, match=':4: expected 4 fields'):
    audioset_prepare.read_segments(str(path), classes)
  audioset_fixture.write(path, header + 'abc, ten, 20.0, "/m/fx001"\n')
  with pytest.raises(ValueError, match=":4: bad start/end seconds 'ten'"):
    audioset_prepare.read_segments(str(path), classes)


# Finding clips.


def test_find_clips_reports_missing_and_name_variants(tmp_path, classes):
  segs = audioset_prepare.read_segments(
      os.path.join(FIXTURE, 'eval_segments.csv'), classes)
  found, missing = audioset_prepare.find_clips(
      segs, audioset_prepare.index_clip_dir(CLIPS))
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
  found, missing = audioset_prepare.find_clips(
      segs[:1], audioset_prepare.index_clip_dir(str(tmp_path)))
  assert [os.path.basename(p) for _, p in found] == ['cVtILMfX4ON_130.mkv']
  with pytest.raises(FileNotFoundError, match='no_such_dir'):
    audioset_prepare.index_clip_dir(str(tmp_path / 'no_such_dir'))


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
  assert audioset.num_examples('eval', audioset_fixture.config(out)) == 6
  assert audioset.num_classes(audioset_fixture.config(out)) == 4


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
    audioset.load(audioset_fixture.config(out, modality='video', csv_dir=''),
                  'unbalanced_train', is_training=False, batch_dims=(1, 1),
                  seed=0)
