"""AudioSet end to end: jaxline training, checkpoint and mAP evaluation.

The committed fixture (tests/testdata/audioset: 4 classes, 8 balanced_train
and 6 usable eval clips of spoken digits with moving handwritten digits) is
prepared into TFRecords once per session at 16x16 pixels; the
MultiLabelExperiment of configs/audioset.py:<preset>,debug then trains a
tiny Perceiver for two steps over the 8 fake CPU devices of conftest.py and
evaluates the saved checkpoint with 16 windows per clip.
"""
# pylint: disable=protected-access

import functools
import math
import os

import jax
import numpy as np
import pytest

from configs import audioset as audioset_config
import experiments
from experiments import multilabel
from perceiver_jax.analysis import summary as summary_lib
from perceiver_jax.data import audioset as audioset_data
from perceiver_jax.training import checkpointing
from perceiver_jax.training import jaxline_compat
from perceiver_jax.training import multilabel_metrics
from perceiver_jax.training import parallel
from scripts import prepare_audioset
from tests import helpers
from tests import test_configs

pytest.importorskip('av')  # Preparing the fixture decodes clips with PyAV.

jaxline = jaxline_compat.import_jaxline()
_load_config = test_configs._load

_FIXTURE = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'testdata', 'audioset')
_NUM_EVAL_CLIPS = 6  # 7 eval rows, one of them without a clip on disk.
_NUM_WINDOWS = 16
# Every Table 3 input (raw audio, mel, video, raw audio + video).
_PRESETS = ('modality=audio', 'modality=audio,audio=mel', 'modality=video',
            'modality=audio_video')


@pytest.fixture(scope='session')
def audioset_tfrecords(tmp_path_factory) -> str:
  """The fixture's balanced_train and eval splits as TFRecords (16x16 px)."""
  out = str(tmp_path_factory.mktemp('audioset_debug'))
  summary = prepare_audioset.prepare(
      csv_dir=_FIXTURE, clip_dir=os.path.join(_FIXTURE, 'clips'),
      output_dir=out, splits=('balanced_train', 'eval'), video_size=16,
      examples_per_shard=4)
  assert summary['splits']['eval']['written'] == _NUM_EVAL_CLIPS
  return out


def _config(data_dir, checkpoint_dir, preset, steps=2):
  """The preset's debug config reading `data_dir`, saving every 2 steps."""
  config = _load_config('audioset.py', preset + ',debug')
  config.checkpoint_dir = str(checkpoint_dir)
  config.training_steps = steps
  config.save_checkpoint_interval = 2
  config.log_tensors_interval = 1
  config.log_train_data_interval = 1
  config.experiment_kwargs.config.data.data_dir = data_dir
  return config


def _window(inputs, index):
  """Window `index` of eval inputs {key: [B, W, ...]} -> {key: [B, ...]}."""
  return {k: v[:, index] for k, v in inputs.items()}


def _leaf_shapes(inputs):
  return {k: v.shape for k, v in inputs.items()}


# Config.


@pytest.mark.parametrize('preset, modality, audio', [
    ('modality=audio', 'audio', 'raw'),
    ('modality=audio,audio=mel', 'audio', 'mel'),
    ('modality=video', 'video', 'raw'),
    ('modality=audio_video', 'audio_video', 'raw'),
    ('modality=audio_video,audio=mel', 'audio_video', 'mel'),
])
def test_config_data_section_has_the_loader_fields_and_defaults(
    preset, modality, audio):
  """Every loader field is in the config (overridable from the command
  line) with the loader's default; input_shape is what the loader yields."""
  data = _load_config('audioset.py', preset).experiment_kwargs.config.data
  defaults = audioset_data.default_config()
  assert set(defaults) <= set(data)
  for key in set(defaults) - {'modality', 'audio_representation'}:
    assert data[key] == defaults[key], key
  assert (data.modality, data.audio_representation) == (modality, audio)
  expected = {'audio': (61_440,), 'spectrogram': (96, 50),
              'video': (32, 224, 224, 3)}
  assert dict(data.input_shape) == {
      k: v for k, v in expected.items()
      if k in _expected_keys(data.modality, data.audio_representation)}
  assert data.num_classes == audioset_config.NUM_CLASSES == 527
  with pytest.raises(AttributeError):
    data.mel_num_binz = 64  # Locked: a typo must not pass silently.


def _expected_keys(modality, representation):
  keys = set()
  if modality != 'video':
    keys.add('audio' if representation == 'raw' else 'spectrogram')
  if modality != 'audio':
    keys.add('video')
  return keys


@pytest.mark.parametrize('preset', _PRESETS + (
    'modality=audio_video,audio=mel',))
def test_debug_preset_is_valid_for_the_loader(preset):
  data = _load_config('audioset.py',
                      preset + ',debug').experiment_kwargs.config.data
  audioset_data._check_config(data)
  assert data.csv_dir == _FIXTURE
  assert data.num_classes == 4 and data.num_eval_windows == _NUM_WINDOWS
  # The shapes the model is built for are the loader's shapes.
  for key, shape in data.input_shape.items():
    if key == 'audio':
      assert shape == (audioset_data.window_samples(data),)
    elif key == 'spectrogram':
      assert shape == audioset_data.spectrogram_shape(data)
    else:
      assert shape == (data.num_frames, data.video_size, data.video_size, 3)


@pytest.mark.parametrize('preset, byte_array', [
    ('modality=audio', [480, 128 + 129]),
    ('modality=audio,audio=mel', [4_800, 1 + 2 * 65]),
    ('modality=video', [12_544, 483]),
    ('modality=audio_video', [13_024, 487]),
    ('modality=audio_video,audio=mel', [17_344, 487]),
])
def test_paper_presets_have_paper_byte_arrays(preset, byte_array):
  """P1 Tab. 3 / P2 Tab. 5 input sizes M x C."""
  summary = summary_lib.summarize(
      _load_config('audioset.py', preset).experiment_kwargs.config)
  assert summary['byte_array'] == byte_array
  assert summary['latents'] == [512, 512]


# Training and evaluation through jaxline.


# Two presets marked slow keep the default run short; audio + video is also
# evaluated (not trained) by the next test.
@pytest.mark.parametrize('preset', [
    'modality=audio', 'modality=video',
    pytest.param('modality=audio,audio=mel', marks=pytest.mark.slow),
    pytest.param('modality=audio_video', marks=pytest.mark.slow)])
def test_train_checkpoint_and_evaluate(audioset_tfrecords, tmp_path, preset):
  config = _config(audioset_tfrecords, tmp_path, preset)
  writer = helpers.ScalarRecorder()
  jaxline.train.train(multilabel.MultiLabelExperiment, config,
                      checkpointing.make_checkpointer(config, 'train'),
                      writer=writer)
  restored = checkpointing.restore_checkpoint(config.checkpoint_dir)
  assert int(restored['global_step']) == 2
  losses = [s['loss'] for _, s in writer.scalars]
  assert losses and all(np.isfinite(losses))
  # 4 sigmoid outputs near initialisation: about log(2) each.
  assert all(0.2 < loss < 2.0 for loss in losses), losses

  results = experiments.evaluate_checkpoint(config, config.checkpoint_dir)
  assert results['step'] == 2 and results['split'] == 'eval'
  # Every eval clip exactly once (8 devices x 1: 2 padding rows masked).
  assert results['num_examples'] == _NUM_EVAL_CLIPS
  assert results['num_classes_evaluated'] == 4
  assert 0.0 < results['mAP'] <= 1.0 and 0.0 <= results['AUC'] <= 1.0
  assert np.isfinite(results['d_prime'])

  # What evaluation fed the model: 16 windows per clip.
  exp_config = config.experiment_kwargs.config
  experiment = multilabel.MultiLabelExperiment(
      'eval', jax.random.key(0), exp_config)
  batches = list(experiment._build_input(is_training=False))
  assert len(batches) == 1
  data = exp_config.data
  assert _leaf_shapes(batches[0]['inputs']) == {
      k: (8, 1, _NUM_WINDOWS) + tuple(v) for k, v in data.input_shape.items()}
  assert batches[0]['labels'].shape == (8, 1, 4)


def test_eval_averages_window_scores_over_every_clip_once(audioset_tfrecords,
                                                          tmp_path):
  """Experiment eval == per-window sigmoid scores averaged by hand, and it
  does not depend on how clips are batched and padded over devices."""
  config = _config(audioset_tfrecords, tmp_path, 'modality=audio_video')
  exp_config = config.experiment_kwargs.config
  experiment = multilabel.MultiLabelExperiment('train', jax.random.key(3),
                                               exp_config)
  experiment._initialize_train(0)
  params = parallel.unreplicate(experiment._params)

  results = {}
  for batch_size in (8, 16):  # 2 and 10 padding rows.
    with exp_config.unlocked():
      exp_config.evaluation.batch_size = batch_size
    evaluator = multilabel.MultiLabelExperiment('eval', jax.random.key(0),
                                                exp_config)
    evaluator._params = experiment._params
    results[batch_size] = evaluator.evaluate(
        global_step=np.zeros([jax.local_device_count()], np.int32), rng=None)
  for key in results[8]:
    np.testing.assert_allclose(results[16][key], results[8][key], rtol=1e-6,
                               err_msg=key)

  # By hand: one forward pass per window, sigmoid, mean over the windows.
  batch = next(audioset_data.load(
      exp_config.data, 'eval', is_training=False, batch_dims=(1, 8), seed=0))
  inputs = jax.tree.map(lambda x: x[0, :_NUM_EVAL_CLIPS], batch['inputs'])
  apply = jax.jit(functools.partial(experiment.forward.apply, params, None,
                                    is_training=False))
  scores = np.mean([jax.nn.sigmoid(apply(_window(inputs, w)))
                    for w in range(_NUM_WINDOWS)], axis=0)  # [clips, classes]
  labels = batch['labels'][0, :_NUM_EVAL_CLIPS]
  expected = multilabel_metrics.multilabel_metrics(labels, scores)
  assert results[8]['num_examples'] == _NUM_EVAL_CLIPS
  for key, value in expected.items():
    np.testing.assert_allclose(results[8][key], value, rtol=1e-5,
                               err_msg=key)
  assert not math.isclose(results[8]['mAP'], 0.0)


@pytest.mark.parametrize('process_count, per_device', [(2, 2), (4, 1)])
def test_hosts_run_the_same_number_of_eval_batches(
    audioset_tfrecords, tmp_path, monkeypatch, process_count, per_device):
  """Several hosts: whole shards (4 + 2 clips) per host, or every 4th
  record; each host pads to the largest share's batch count, so that the
  pmapped all_gather of the eval stays in step, and the hosts' real rows
  are the 6 clips, each once."""
  data = _config(audioset_tfrecords, tmp_path,
                 'modality=audio').experiment_kwargs.config.data

  def host_batches(index):
    monkeypatch.setattr(jax, 'process_index', lambda: index)
    monkeypatch.setattr(jax, 'process_count', lambda: process_count)
    return list(audioset_data.load(data, 'eval', is_training=False,
                                   batch_dims=(1, per_device), seed=0))

  hosts = [host_batches(i) for i in range(process_count)]
  assert len({len(batches) for batches in hosts}) == 1
  assert len(hosts[0]) == 2
  real = [b['inputs']['audio'][0, i] for batches in hosts for b in batches
          for i in np.flatnonzero(b['mask'][0])]
  assert len(real) == _NUM_EVAL_CLIPS
  monkeypatch.undo()
  (everything,) = list(audioset_data.load(data, 'eval', is_training=False,
                                          batch_dims=(1, 8), seed=0))
  expected = everything['inputs']['audio'][0, :_NUM_EVAL_CLIPS]
  assert sorted(float(x.sum()) for x in real) == sorted(
      float(x.sum()) for x in expected)
  for batches in hosts:  # All-padding batches have the real shapes.
    assert {b['inputs']['audio'].shape for b in batches} == {
        (1, per_device, _NUM_WINDOWS, 7_680)}


def test_count_records_reads_headers_and_rejects_truncation(
    audioset_tfrecords, tmp_path):
  meta = audioset_data.read_metadata(audioset_tfrecords)
  files = [os.path.join(audioset_tfrecords, f)
           for f in meta['splits']['eval']['files']]
  assert [audioset_data.count_records(f) for f in files] == [4, 2]
  with open(files[1], 'rb') as f:
    data = f.read()
  truncated = tmp_path / 'truncated.tfrecord'
  truncated.write_bytes(data[:-10])
  with pytest.raises(ValueError, match='truncated.tfrecord'):
    audioset_data.count_records(str(truncated))
