r"""AudioSet loader: prepared TFRecord shards -> multi-label batches.

Reads the shards and `metadata.json` that `scripts/prepare_audioset.py`
writes (perceiver_jax.data.audioset_prepare) with tf.data and cuts model
inputs (P1 Sec. 4.2, Tab. 3): training takes one random 1.28 s window per
clip, i.e. 61,440 samples at 48 kHz and the matching 32 frames at 25 fps;
evaluation takes 16 overlapping windows evenly spaced over the whole 10 s
clip (the experiment averages their scores). Spectrograms and SpecAugment
come from perceiver_jax.data.audio_ops.

Batches follow perceiver_jax.data.common but are multi-label:
  'inputs': dict, depending on config.modality / config.audio_representation:
      'audio':       float32 [*bd, 61440] waveform in [-1, 1]   (raw), or
      'spectrogram': float32 [*bd, 96, 50] log-mel              (mel),
      'video':       float32 [*bd, 32, S, S, 3] RGB in [0, 1].
    Evaluation inserts a windows axis: [*bd, 16, ...].
  'labels': float32 [*bd, num_classes] multi-hot.
  'mask':   float32 [*bd].
where bd = batch_dims = (num_local_devices, per_device_batch) and S =
config.video_size.
"""

import json
import os
from typing import Any, Iterator, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from perceiver_jax.data import audio_ops
from perceiver_jax.data import audioset_prepare
from perceiver_jax.data import common

MODALITIES = ('audio', 'video', 'audio_video')
AUDIO_REPRESENTATIONS = ('raw', 'mel')


def default_config() -> ml_collections.ConfigDict:
  """Loader settings; the defaults are P1's AudioSet set-up.

  Fields:
    name: 'audioset' (registry key).
    data_dir: directory of TFRecord shards + metadata.json written by
      scripts/prepare_audioset.py.
    csv_dir: optional directory of the official CSVs; if set, the class list
      in it must match the one the shards were written with.
    modality: 'audio', 'video' or 'audio_video'.
    audio_representation: 'raw' (waveform) or 'mel' (log-mel spectrogram).
    sample_rate: audio rate in Hz; must equal the rate of the shards.
    window_seconds: length of one model input window (1.28 s).
    num_eval_windows: overlapping windows per clip at evaluation (16).
    video_size: side S of the square frames fed to the model; frames are
      resized if the shards hold another size.
    num_frames: frames per window (32 = 1.28 s x 25 fps).
    fps: video frame rate; must equal the rate of the shards.
    mel_num_bins, mel_frame_length, mel_hop_length, mel_fft_length,
      mel_lower_hz, mel_upper_hz, mel_log_offset: log-mel parameters (see
      audio_ops; frames x bins = 96 x 50 = 4,800).
    specaugment: apply SpecAugment to training spectrograms.
    specaugment_num_freq_masks, specaugment_max_freq_bins,
      specaugment_num_time_masks, specaugment_max_time_frames: mask counts
      and maximum widths.
    shuffle_buffer: training shuffle buffer, in serialized examples (~3.5 MB
      each with 224x224 JPEG video, so 256 hold ~1 GB).
    num_parallel_calls: tf.data map parallelism (-1 = AUTOTUNE).
  """
  return ml_collections.ConfigDict(dict(
      name='audioset',
      data_dir='',
      csv_dir='',
      modality='audio_video',
      audio_representation='raw',
      sample_rate=48_000,
      window_seconds=1.28,
      num_eval_windows=16,
      video_size=224,
      num_frames=32,
      fps=25,
      mel_num_bins=50,
      mel_frame_length=1280,
      mel_hop_length=640,
      mel_fft_length=2048,
      mel_lower_hz=20.0,
      mel_upper_hz=24_000.0,
      mel_log_offset=1e-6,
      specaugment=True,
      specaugment_num_freq_masks=2,
      specaugment_max_freq_bins=8,
      specaugment_num_time_masks=2,
      specaugment_max_time_frames=16,
      shuffle_buffer=256,
      num_parallel_calls=-1,
  ))


def read_metadata(data_dir: str) -> dict[str, Any]:
  """Reads data_dir/metadata.json written by scripts/prepare_audioset.py.

  Raises:
    FileNotFoundError: if data_dir or the metadata file is missing.
    ValueError: if the metadata is corrupt or of another format version.
  """
  metadata_file = audioset_prepare.METADATA_FILE
  path = os.path.join(data_dir, metadata_file)
  if not data_dir or not os.path.isfile(path):
    raise FileNotFoundError(
        f'No AudioSet TFRecords at data_dir={data_dir!r} ({metadata_file} '
        'missing); run scripts/prepare_audioset.py first.')
  try:
    with open(path, encoding='utf-8') as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'Corrupt {path}: {e}') from e
  version = audioset_prepare.FORMAT_VERSION
  if meta.get('format_version') != version:
    raise ValueError(f'{path}: format_version {meta.get("format_version")} '
                     f'!= {version}; re-run prepare_audioset.py.')
  return meta


# ---------------------------------------------------------------------------
# Loader.


def num_examples(split: str, config: ml_collections.ConfigDict) -> int:
  """Examples written for `split` in config.data_dir (all hosts)."""
  _check_split(split)
  return int(_split_meta(read_metadata(config.data_dir), split,
                         config.data_dir)['written'])


def num_classes(config: ml_collections.ConfigDict) -> int:
  return len(read_metadata(config.data_dir)['classes'])


def window_samples(config: ml_collections.ConfigDict) -> int:
  """Audio samples per window: 1.28 s x 48 kHz = 61,440."""
  return int(round(config.window_seconds * config.sample_rate))


def spectrogram_shape(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(frames, bins) of one window's log-mel spectrogram: (96, 50) default."""
  frames = -(-window_samples(config) // config.mel_hop_length)  # pad_end.
  return frames, config.mel_num_bins


def eval_window_starts(clip_frames: int, num_frames: int,
                       num_windows: int) -> np.ndarray:
  """First frame of each evaluation window: evenly spaced, first at 0, last
  ending at the clip end. int32 [num_windows]."""
  if clip_frames < num_frames:
    raise ValueError(f'Clip of {clip_frames} frames is shorter than one '
                     f'window of {num_frames}.')
  return np.round(np.linspace(0, clip_frames - num_frames,
                              num_windows)).astype(np.int32)


def load(config: ml_collections.ConfigDict, split: str, *, is_training: bool,
         batch_dims: Sequence[int], seed: int,
         start_step: int = 0) -> Iterator[common.Batch]:
  """Iterates over this host's share of a prepared split (module docstring).

  Args:
    config: see `default_config`.
    split: 'balanced_train', 'unbalanced_train' or 'eval'.
    is_training: infinite, shuffled, one random window per clip (+
      SpecAugment); else one ordered pass, `num_eval_windows` windows per
      clip, last batch padded and masked. With several hosts, every host
      yields as many eval batches as the largest share needs (the extra
      ones all padding), so that pmapped collectives stay in step.
    batch_dims: (num_local_devices, per_device_batch).
    seed: shuffling / cropping / masking seed.
    start_step: training steps already taken (a resumed run); the stream is
      reseeded from (seed, start_step) so it never replays the same order.

  Yields:
    Batches per the module docstring.

  Raises:
    FileNotFoundError: if the shards are missing.
    ValueError: on a bad config, split, or shards that do not match it.
  """
  batch_dims = common.check_batch_dims(batch_dims)
  batch_size = batch_dims[0] * batch_dims[1]
  if start_step:
    seed = int(np.random.SeedSequence([seed, start_step]).generate_state(1)[0]
              % 2**31)
  _check_split(split)
  _check_config(config)
  meta = read_metadata(config.data_dir)
  _check_meta(config, meta)
  split_meta = _split_meta(meta, split, config.data_dir)
  if split_meta.get('missing'):
    logging.warning('AudioSet %s: %d of %d CSV rows had no clip on disk at '
                    'preparation (%d unusable); using the %d written.',
                    split, split_meta['missing'], split_meta['rows'],
                    split_meta.get('unusable', 0), split_meta['written'])
  files = [os.path.join(config.data_dir, f) for f in split_meta['files']]
  for f in files:
    if not os.path.isfile(f):
      raise FileNotFoundError(f'AudioSet shard listed in metadata is missing: '
                              f'{f}')
  if not files:
    raise ValueError(f'AudioSet split {split!r} has no shards in '
                     f'{config.data_dir}.')
  process_index, process_count = jax.process_index(), jax.process_count()
  ds = _host_records(files, process_index, process_count,
                     shuffle=is_training, seed=seed)
  parse = _make_parser(config, meta, is_training)
  calls = (tf.data.AUTOTUNE if config.num_parallel_calls < 0
           else config.num_parallel_calls)
  if is_training:
    # Shuffle serialized records within an epoch, then repeat: the buffer
    # never holds more than this host's share.
    ds = ds.shuffle(config.shuffle_buffer, seed=seed,
                    reshuffle_each_iteration=True).repeat()
    # One stateless seed per example keeps crops reproducible under parallel
    # map.
    seeds = tf.data.Dataset.random(seed=seed).batch(2)
    ds = tf.data.Dataset.zip((ds, seeds)).map(parse, num_parallel_calls=calls)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(2)
    return _naming_damaged_shards(_train_iterator(ds, batch_dims), files)
  ds = ds.map(lambda r: parse(r, tf.zeros([2], tf.int64)),
              num_parallel_calls=calls, deterministic=True)
  ds = ds.batch(batch_size).prefetch(2)
  num_batches = None
  if process_count > 1:
    shares = _host_share_sizes(files, int(split_meta['written']),
                               process_count)
    num_batches = max(1, -(-max(shares) // batch_size))
  return _naming_damaged_shards(
      _eval_iterator(ds, batch_size, batch_dims, num_batches), files)


def _naming_damaged_shards(batches: Iterator[common.Batch],
                           files: Sequence[str]) -> Iterator[common.Batch]:
  """`batches`, with tf.data's DataLossError (which names no file: shards
  are interleaved) turned into a ValueError naming the damaged shard.

  Checking every shard up front would read the whole split before the first
  batch; the shards are searched only once a read has failed.
  """
  try:
    yield from batches
  except tf.errors.DataLossError as e:
    raise ValueError(
        f'{_find_damaged_shard(files)}: re-run scripts/prepare_audioset.py '
        f'for it, or copy it again. (tf.data: {e.message.strip()})') from e


def _find_damaged_shard(files: Sequence[str]) -> str:
  """'AudioSet shard <path> is truncated/corrupt ...' for the first damaged
  file of `files`: a truncation from the record headers (cheap), else a
  checksum failure from reading the records."""
  for path in files:
    try:
      count_records(path)
    except ValueError as e:
      return f'AudioSet shard is damaged: {e}'
  for path in files:
    try:
      for _ in tf.data.TFRecordDataset(path):
        pass
    except tf.errors.DataLossError:
      return (f'AudioSet shard {path} is corrupt (a record fails its '
              'checksum)')
  return f'One of the AudioSet shards {list(files)} is damaged'


def _train_iterator(ds, batch_dims):
  for batch in ds.as_numpy_iterator():
    batch['mask'] = np.ones([batch_dims[0] * batch_dims[1]], np.float32)
    yield common.reshape_for_devices(batch, batch_dims)


def _eval_iterator(ds, batch_size, batch_dims, num_batches=None):
  """This host's padded batches, then all-padding ones up to num_batches."""
  count = 0
  for batch in ds.as_numpy_iterator():
    count += 1
    yield common.reshape_for_devices(common.pad_batch(batch, batch_size),
                                     batch_dims)
  if num_batches is not None and count < num_batches:
    padding = jax.tree.map(
        lambda spec: np.zeros([batch_size] + spec.shape[1:].as_list(),
                              spec.dtype.as_numpy_dtype), ds.element_spec)
    padding['mask'] = np.zeros([batch_size], np.float32)
    for _ in range(num_batches - count):
      yield common.reshape_for_devices(padding, batch_dims)


def _host_share_sizes(files: Sequence[str], num_records: int,
                      process_count: int) -> list[int]:
  """Records each host reads, as `_host_records` splits them."""
  if len(files) >= process_count:
    counts = [count_records(f) for f in files]
    if sum(counts) != num_records:
      raise ValueError(f'The shards {files[0]}... hold {sum(counts)} records '
                       f'but metadata.json says {num_records}; re-run '
                       'prepare_audioset.py.')
    return [sum(counts[i::process_count]) for i in range(process_count)]
  return [len(range(i, num_records, process_count))
          for i in range(process_count)]


def count_records(path: str) -> int:
  """Records in a TFRecord file, reading only their 12-byte headers.

  Raises:
    ValueError: if the file ends inside a record.
  """
  size = tf.io.gfile.stat(path).length
  count, offset = 0, 0
  with tf.io.gfile.GFile(path, 'rb') as f:
    while offset < size:
      f.seek(offset)
      header = f.read(12)  # uint64 length, uint32 masked CRC of the length.
      if len(header) < 12:
        raise ValueError(f'Truncated TFRecord file {path} at byte {offset}.')
      length = int.from_bytes(header[:8], 'little')
      offset += 12 + length + 4  # Header, data, uint32 CRC of the data.
      count += 1
  if offset != size:
    raise ValueError(f'Truncated TFRecord file {path}: its last record ends '
                     f'at byte {offset} of {size}.')
  return count


def _host_records(files: Sequence[str], process_index: int,
                  process_count: int, *, shuffle: bool,
                  seed: int) -> tf.data.Dataset:
  """This host's records: whole files when there are enough, else every
  process_count-th record."""
  if len(files) >= process_count:
    files = list(files)[process_index::process_count]
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
      ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    if not shuffle:  # Evaluation: files in order.
      return ds.flat_map(tf.data.TFRecordDataset)
    return ds.interleave(tf.data.TFRecordDataset,
                         cycle_length=min(len(files), 8),
                         num_parallel_calls=tf.data.AUTOTUNE,
                         deterministic=True)
  return tf.data.TFRecordDataset(files).shard(process_count, process_index)


def _make_parser(config, meta, is_training):
  """Returns fn(serialized, seed[2]) -> {'inputs': {...}, 'labels': ...}."""
  use_audio = config.modality in ('audio', 'audio_video')
  use_video = config.modality in ('video', 'audio_video')
  n_classes = len(meta['classes'])
  clip_samples, clip_frames = meta['clip_samples'], meta['clip_frames']
  stored_size = meta['video_size']
  samples_per_frame = config.sample_rate // config.fps
  win_samples = window_samples(config)
  features = {'labels': tf.io.VarLenFeature(tf.int64)}
  if use_audio:
    features['audio'] = tf.io.FixedLenFeature([], tf.string)
  if use_video:
    features['video'] = tf.io.FixedLenFeature(
        [clip_frames] if meta['video_format'] == 'jpeg' else [], tf.string)
  eval_starts = tf.constant(eval_window_starts(
      clip_frames, config.num_frames, config.num_eval_windows))

  def audio_windows(ex, starts):  # starts: int32 [W] -> float32 [W, L]
    if meta['audio_dtype'] == 'int16':
      wave = tf.cast(tf.io.decode_raw(ex['audio'], tf.int16),
                     tf.float32) / 32768.0
    else:
      wave = tf.io.decode_raw(ex['audio'], tf.float32)
    wave = tf.ensure_shape(wave, [clip_samples])
    idx = starts[:, None] + tf.range(win_samples)[None, :]
    return tf.gather(wave, idx)

  def video_windows(ex, starts):  # int32 [W] -> float32 [W, T, S, S, 3]
    idx = starts[:, None] + tf.range(config.num_frames)[None, :]  # [W, T]
    if meta['video_format'] == 'jpeg':
      needed = tf.gather(ex['video'], tf.reshape(idx, [-1]))
      frames = tf.map_fn(
          lambda b: tf.io.decode_jpeg(b, channels=3), needed,
          fn_output_signature=tf.TensorSpec(
              [stored_size, stored_size, 3], tf.uint8))
    else:
      clip = tf.reshape(tf.io.decode_raw(ex['video'], tf.uint8),
                        [clip_frames, stored_size, stored_size, 3])
      frames = tf.gather(clip, tf.reshape(idx, [-1]))
    frames = tf.image.convert_image_dtype(frames, tf.float32)
    if stored_size != config.video_size:
      frames = tf.image.resize(frames, [config.video_size] * 2,
                               antialias=True)
      frames = tf.clip_by_value(frames, 0.0, 1.0)
    return tf.reshape(frames, [-1, config.num_frames, config.video_size,
                               config.video_size, 3])

  def parse(serialized, seed):
    ex = tf.io.parse_single_example(serialized, features)
    seeds = tf.random.experimental.stateless_split(seed, 3)
    if is_training and use_video:
      # Whole frames, so audio and video windows stay aligned.
      frame0 = tf.random.stateless_uniform(
          [1], seeds[0], 0, clip_frames - config.num_frames + 1, tf.int32)
      sample0 = frame0 * samples_per_frame
    elif is_training:
      sample0 = tf.random.stateless_uniform(
          [1], seeds[0], 0, clip_samples - win_samples + 1, tf.int32)
      frame0 = None
    else:
      frame0, sample0 = eval_starts, eval_starts * samples_per_frame
    inputs = {}
    if use_audio:
      wave = audio_windows(ex, sample0)  # [W, 61440]
      if config.audio_representation == 'mel':
        spec = audio_ops.log_mel_spectrogram(wave, config)  # [W, frames, bins]
        if is_training and config.specaugment:
          spec = audio_ops.spec_augment(spec[0], seeds[1], config)[None]
        inputs['spectrogram'] = spec
      else:
        inputs['audio'] = wave
    if use_video:
      inputs['video'] = video_windows(ex, frame0)
    if is_training:
      inputs = {k: v[0] for k, v in inputs.items()}  # Drop the windows axis.
    labels = tf.sparse.to_dense(ex['labels'])
    multi_hot = tf.reduce_max(tf.one_hot(labels, n_classes, dtype=tf.float32),
                              axis=0)
    multi_hot = tf.ensure_shape(
        tf.reshape(multi_hot, [n_classes]), [n_classes])
    return {'inputs': inputs, 'labels': multi_hot}

  return parse


def _check_split(split: str) -> None:
  splits = audioset_prepare.SPLITS
  if split not in splits:
    raise ValueError(f'Unknown AudioSet split {split!r}; expected {splits}.')


def _check_config(config: ml_collections.ConfigDict) -> None:
  """Validates loader settings eagerly, naming the bad value."""
  if config.modality not in MODALITIES:
    raise ValueError(f'modality={config.modality!r} not in {MODALITIES}.')
  if config.audio_representation not in AUDIO_REPRESENTATIONS:
    raise ValueError(f'audio_representation={config.audio_representation!r}'
                     f' not in {AUDIO_REPRESENTATIONS}.')
  for field in ('sample_rate', 'fps', 'num_frames', 'video_size',
                'num_eval_windows', 'shuffle_buffer'):
    if config[field] <= 0:
      raise ValueError(f'{field}={config[field]} must be positive.')
  if config.sample_rate % config.fps:
    raise ValueError(f'sample_rate={config.sample_rate} must be a multiple '
                     f'of fps={config.fps} to align audio and video.')
  win = config.window_seconds * config.sample_rate
  if config.window_seconds <= 0 or abs(win - round(win)) > 1e-6:
    raise ValueError(f'window_seconds={config.window_seconds} must be a '
                     f'positive whole number of samples at {config.sample_rate}'
                     ' Hz.')
  if round(win) != config.num_frames * (config.sample_rate // config.fps):
    raise ValueError(
        f'num_frames={config.num_frames} at fps={config.fps} does not span '
        f'window_seconds={config.window_seconds}.')
  if config.audio_representation == 'mel':
    frames, bins = spectrogram_shape(config)
    if not 0 <= config.specaugment_max_freq_bins <= bins:
      raise ValueError(
          f'specaugment_max_freq_bins={config.specaugment_max_freq_bins} '
          f'not in [0, {bins}].')
    if not 0 <= config.specaugment_max_time_frames <= frames:
      raise ValueError(f'specaugment_max_time_frames='
                       f'{config.specaugment_max_time_frames} not in '
                       f'[0, {frames}].')
    if config.mel_fft_length < config.mel_frame_length:
      raise ValueError(f'mel_fft_length={config.mel_fft_length} < '
                       f'mel_frame_length={config.mel_frame_length}.')


def _check_meta(config, meta) -> None:
  """The shards must hold what the config asks for."""
  for field in ('sample_rate', 'fps'):
    if meta[field] != config[field]:
      raise ValueError(
          f'config.{field}={config[field]} but the shards in '
          f'{config.data_dir} were written at {meta[field]}; re-run '
          f'prepare_audioset.py with --{field}={config[field]}.')
  needed = {'audio': ['audio'], 'video': ['video'],
            'audio_video': ['audio', 'video']}[config.modality]
  for m in needed:
    if m not in meta['modalities']:
      raise ValueError(f'modality={config.modality!r} needs {m}, but the '
                       f'shards in {config.data_dir} hold only '
                       f'{meta["modalities"]}.')
  if meta['clip_frames'] < config.num_frames:
    raise ValueError(f'Clips of {meta["clip_frames"]} frames are shorter than '
                     f'num_frames={config.num_frames}.')
  if config.csv_dir:
    classes = audioset_prepare.read_classes(
        os.path.join(config.csv_dir, audioset_prepare.CLASS_CSV))
    if list(classes.mids) != [c['mid'] for c in meta['classes']]:
      raise ValueError(f'The class list in {config.csv_dir} differs from the '
                       f'one the shards in {config.data_dir} were written '
                       'with; re-run prepare_audioset.py.')


def _split_meta(meta, split, data_dir):
  if split not in meta['splits']:
    raise ValueError(f'AudioSet split {split!r} was not prepared in '
                     f'{data_dir} (have {sorted(meta["splits"])}); run '
                     f'prepare_audioset.py --splits={split}.')
  return meta['splits'][split]
