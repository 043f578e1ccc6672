"""The AudioSet test fixture, shared by the data tests of AudioSet.

tests/testdata/audioset (built by scripts/make_audioset_fixture.py) holds
real audio-visual clips: spoken digit words + moving handwritten digits, 4
classes, CSVs in the official format. The `classes` and `prepared` pytest
fixtures (import them into a test module) parse its class list and run
scripts/prepare_audioset.py on it once per test module.
"""

import os

import pytest

from perceiver_jax.data import audioset
from perceiver_jax.data import audioset_prepare
from scripts import prepare_audioset

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                       'testdata', 'audioset')
CLIPS = os.path.join(FIXTURE, 'clips')
MISSING_YTID = 'PIFG8JIFmOn'  # eval row without a clip on disk.
AUDIO_ONLY_YTID = 'PozrROqE3LS'  # unbalanced_train .flac clip.
SHORT_YTID = 'z3z6pQqzP_B'  # balanced_train clip of 8 s.
STORED_SIZE = 32


@pytest.fixture(scope='module')
def classes():
  return audioset_prepare.read_classes(
      os.path.join(FIXTURE, audioset_prepare.CLASS_CSV))


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """Fixture clips -> TFRecords via the script's entry point (once)."""
  out = str(tmp_path_factory.mktemp('audioset_tfrecords'))
  summary = prepare_audioset.main([
      f'--csv_dir={FIXTURE}', f'--clip_dir={CLIPS}', f'--output_dir={out}',
      '--splits=balanced_train,eval,unbalanced_train',
      f'--video_size={STORED_SIZE}', '--examples_per_shard=3'])
  return out, summary


def config(data_dir, **kwargs):
  """Loader config for shards in `data_dir`, checked against the fixture."""
  result = audioset.default_config()
  result.data_dir = data_dir
  result.csv_dir = FIXTURE
  result.video_size = STORED_SIZE
  result.update(kwargs)
  return result


def write(path, text):
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  return path
