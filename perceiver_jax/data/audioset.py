r"""AudioSet: official CSVs, the user's clips, TFRecord shards, and the loader.

AudioSet ships labels, not media: users bring one clip per YouTube id. Data
flow:

  1. `scripts/prepare_audioset.py` reads the official CSVs (`read_classes`,
     `read_segments`), finds each segment's clip on disk (`find_clips`),
     decodes it ONCE with PyAV (`decode_clip`: audio resampled to 48 kHz
     mono, video resampled to 25 fps and resized/centre-cropped to a square),
     and writes TFRecord shards plus `metadata.json` (`serialize_example`).
     Clips missing from disk are counted, logged and listed, never silently
     dropped.
  2. `load` reads the shards with tf.data and cuts model inputs (P1 Sec. 4.2,
     Tab. 3): training takes one random 1.28 s window per clip, i.e. 61,440
     samples at 48 kHz and the matching 32 frames at 25 fps; evaluation takes
     16 overlapping windows evenly spaced over the whole 10 s clip (the
     experiment averages their scores).

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

Mel spectrogram (P1 states only "4,800 inputs" after flattening; parameters
are ours): 50 mel bins (20 Hz - 24 kHz) of the STFT magnitude with a 1,280
sample (26.7 ms) Hann window, 640 sample (13.3 ms) hop and 2,048-point FFT,
`pad_end=True`, so a 61,440-sample window gives 61,440 / 640 = 96 frames and
96 frames x 50 bins = 4,800 inputs; then log(mel + 1e-6). Training applies
SpecAugment (Park et al. 2019): two frequency masks of up to 8 bins and two
time masks of up to 16 frames, filled with the example's mean log-mel value.

Clip files are expected to hold just the 10 s segment (as AudioSet
downloaders cut them), starting at time 0. They are padded (audio with
silence, video by repeating the last frame) or trimmed to prepare_audioset's
--clip_seconds (10 s), so every stored example has the same shape; the
prepare summary counts padded clips.
"""

import csv
import dataclasses
import json
import math
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from perceiver_jax.data import common

SPLITS = ('balanced_train', 'unbalanced_train', 'eval')
SEGMENT_CSVS = {
    'balanced_train': 'balanced_train_segments.csv',
    'unbalanced_train': 'unbalanced_train_segments.csv',
    'eval': 'eval_segments.csv',
}
CLASS_CSV = 'class_labels_indices.csv'
METADATA_FILE = 'metadata.json'
FORMAT_VERSION = 1
MODALITIES = ('audio', 'video', 'audio_video')
AUDIO_REPRESENTATIONS = ('raw', 'mel')
AUDIO_DTYPES = ('int16', 'float32')
VIDEO_FORMATS = ('jpeg', 'uint8')
# Clip file extensions searched for, in order of preference (containers with
# video first, so an audio-only copy never hides a video).
CLIP_EXTENSIONS = ('.mp4', '.mkv', '.webm', '.mov', '.avi', '.m4a', '.wav',
                   '.flac', '.ogg', '.opus', '.mp3')


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
      module docstring; frames x bins = 96 x 50 = 4,800).
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


# ---------------------------------------------------------------------------
# Official CSVs.


@dataclasses.dataclass(frozen=True)
class ClassTable:
  """The label vocabulary of class_labels_indices.csv."""
  mids: tuple[str, ...]
  display_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.mids)

  def index_of(self) -> dict[str, int]:
    return {mid: i for i, mid in enumerate(self.mids)}


@dataclasses.dataclass(frozen=True)
class Segment:
  """One row of a segment CSV."""
  ytid: str
  start: str  # As written in the CSV (e.g. '30.000'); clip names use it.
  end: str
  labels: tuple[int, ...]  # Sorted class indices.
  line: int  # 1-based line number in the CSV, for error messages.

  @property
  def start_seconds(self) -> float:
    return float(self.start)

  @property
  def end_seconds(self) -> float:
    return float(self.end)


def read_classes(path: str) -> ClassTable:
  """Reads class_labels_indices.csv (header `index,mid,display_name`).

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: on a bad header, a malformed row, duplicate mids, or indices
      that are not exactly 0..n-1.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'AudioSet class list not found: {path}')
  with open(path, newline='', encoding='utf-8') as f:
    rows = list(csv.reader(f, skipinitialspace=True))
  if not rows or [c.strip() for c in rows[0]] != [
      'index', 'mid', 'display_name']:
    raise ValueError(f'{path}:1: expected header "index,mid,display_name", '
                     f'got {rows[0] if rows else "an empty file"}.')
  by_index = {}
  for line, row in enumerate(rows[1:], start=2):
    if not row:
      continue
    if len(row) != 3:
      raise ValueError(f'{path}:{line}: expected 3 fields, got {row}.')
    try:
      index = int(row[0])
    except ValueError:
      raise ValueError(f'{path}:{line}: bad class index {row[0]!r}.') from None
    if index in by_index:
      raise ValueError(f'{path}:{line}: duplicate class index {index}.')
    by_index[index] = (row[1].strip(), row[2].strip())
  if sorted(by_index) != list(range(len(by_index))) or not by_index:
    raise ValueError(f'{path}: class indices must be 0..n-1 with n > 0, got '
                     f'{sorted(by_index)[:10]}...')
  mids, names = zip(*(by_index[i] for i in range(len(by_index))))
  if len(set(mids)) != len(mids):
    dup = sorted({m for m in mids if mids.count(m) > 1})
    raise ValueError(f'{path}: duplicate mids {dup}.')
  return ClassTable(mids=tuple(mids), display_names=tuple(names))


def read_segments(path: str, classes: ClassTable) -> list[Segment]:
  """Reads a segment CSV: `#` comment lines, then rows of
  `YTID, start_seconds, end_seconds, "mid1,mid2,..."`.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: naming the file and line, on a malformed row, bad times, a
      row without labels, or a label id missing from `classes`.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'AudioSet segment CSV not found: {path}')
  index_of = classes.index_of()
  segments = []
  with open(path, newline='', encoding='utf-8') as f:
    for line, text in enumerate(f, start=1):
      if not text.strip() or text.lstrip().startswith('#'):
        continue
      (row,) = csv.reader([text], skipinitialspace=True)
      if len(row) != 4:
        raise ValueError(
            f'{path}:{line}: expected 4 fields (YTID, start_seconds, '
            f'end_seconds, "labels"), got {len(row)}: {text.strip()!r}.')
      ytid, start, end, mids = (x.strip() for x in row)
      try:
        start_s, end_s = float(start), float(end)
      except ValueError:
        raise ValueError(
            f'{path}:{line}: bad start/end seconds {start!r}, {end!r}.'
        ) from None
      if not ytid or not 0 <= start_s < end_s:
        raise ValueError(f'{path}:{line}: bad segment {text.strip()!r}.')
      labels = set()
      for mid in (m.strip() for m in mids.split(',')):
        if mid not in index_of:
          raise ValueError(
              f'{path}:{line}: unknown label id {mid!r} (YTID {ytid}); it '
              f'is not in the class list of {classes.num_classes} classes.')
        labels.add(index_of[mid])
      segments.append(Segment(ytid=ytid, start=start, end=end,
                              labels=tuple(sorted(labels)), line=line))
  return segments


# ---------------------------------------------------------------------------
# The user's clips.


def index_clip_dir(clip_dir: str) -> dict[str, str]:
  """Maps file stem -> path for every clip file under `clip_dir` (recursive).

  When several files share a stem, the earliest extension in
  CLIP_EXTENSIONS wins.

  Raises:
    FileNotFoundError: if `clip_dir` is not a directory.
  """
  if not os.path.isdir(clip_dir):
    raise FileNotFoundError(f'AudioSet clip directory not found: {clip_dir}')
  rank = {ext: i for i, ext in enumerate(CLIP_EXTENSIONS)}
  found = {}
  for root, _, files in os.walk(clip_dir):
    for name in files:
      stem, ext = os.path.splitext(name)
      ext = ext.lower()
      if ext not in rank:
        continue
      old = found.get(stem)
      if old is None or rank[ext] < rank[os.path.splitext(old)[1].lower()]:
        found[stem] = os.path.join(root, name)
  return found


def clip_stems(segment: Segment) -> tuple[str, ...]:
  """File stems under which a segment's clip may be stored, in order.

  `<YTID>`, `<YTID>_<start>` and `<YTID>_<start>_<end>`, with times as in the
  CSV ('30.000'), with 3 decimals, or as integers ('30').
  """
  start, end = segment.start_seconds, segment.end_seconds
  starts = dict.fromkeys([segment.start, f'{start:.3f}', f'{start:g}'])
  ends = dict.fromkeys([segment.end, f'{end:.3f}', f'{end:g}'])
  stems = [segment.ytid]
  stems += [f'{segment.ytid}_{s}' for s in starts]
  stems += [f'{segment.ytid}_{s}_{e}' for s, e in zip(starts, ends)]
  return tuple(dict.fromkeys(stems))


def find_clips(
    segments: Sequence[Segment], clip_index: Mapping[str, str]
) -> tuple[list[tuple[Segment, str]], list[Segment]]:
  """Splits segments into (segment, clip path) pairs found and those missing.

  Args:
    segments: rows of a segment CSV.
    clip_index: `index_clip_dir` of the user's clip directory.

  Returns:
    (found, missing); the caller reports the missing ones.
  """
  found, missing = [], []
  for seg in segments:
    path = next((clip_index[s] for s in clip_stems(seg) if s in clip_index),
                None)
    if path is None:
      missing.append(seg)
    else:
      found.append((seg, path))
  return found, missing


@dataclasses.dataclass
class Clip:
  """A decoded clip.

  Attributes:
    audio: float32 [num_samples] mono waveform in [-1, 1], or None if the
      file has no audio stream (or audio was not requested).
    video: uint8 [num_frames, H, W, 3] RGB at the requested fps, or None.
    sample_rate: rate of `audio` in Hz.
    fps: rate of `video`.
  """
  audio: Optional[np.ndarray]
  video: Optional[np.ndarray]
  sample_rate: int
  fps: float


def decode_clip(path: str, *, sample_rate: int = 48_000, fps: float = 25.0,
                video_size: Optional[int] = 224, with_audio: bool = True,
                with_video: bool = True) -> Clip:
  """Decodes a clip with PyAV: mono audio at `sample_rate`, video at `fps`.

  Video frames are resampled to `fps` by nearest timestamp (each output
  frame k at time k / fps shows the last source frame starting at or before
  it), then resized so the short side is `video_size` and centre-cropped to
  [video_size, video_size] (kept at native size if `video_size` is None).

  Args:
    path: clip file (any container/codec FFmpeg reads).
    sample_rate: output audio rate in Hz.
    fps: output video frame rate.
    video_size: output frame side, or None for native resolution.
    with_audio: decode the first audio stream, if any.
    with_video: decode the first video stream, if any.

  Returns:
    A Clip; `audio`/`video` are None when the stream is absent.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if the file cannot be decoded.
  """
  import av  # pylint: disable=g-import-not-at-top  # Only preparation needs it.
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Clip not found: {path}')
  if sample_rate <= 0 or fps <= 0 or (video_size is not None and
                                      video_size <= 0):
    raise ValueError(f'Bad decode settings sample_rate={sample_rate}, '
                     f'fps={fps}, video_size={video_size}.')
  try:
    container = av.open(path)
  except av.error.FFmpegError as e:
    raise ValueError(f'Cannot open clip {path}: {e}') from e
  with container:
    astream = container.streams.audio[0] if (
        with_audio and container.streams.audio) else None
    vstream = container.streams.video[0] if (
        with_video and container.streams.video) else None
    streams = [s for s in (astream, vstream) if s is not None]
    if not streams:  # demux() with no streams would read them all.
      return Clip(audio=None, video=None, sample_rate=sample_rate, fps=fps)
    resampler = av.AudioResampler(format='flt', layout='mono',
                                  rate=sample_rate)
    chunks, frames, times = [], [], []
    try:
      for packet in container.demux(*streams):
        for frame in packet.decode():
          if packet.stream is astream:
            chunks += [f.to_ndarray().reshape(-1)
                       for f in resampler.resample(frame)]
          else:
            times.append(_frame_time(frame, len(frames), vstream))
            frames.append(_to_rgb(frame, video_size))
      if astream is not None:
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    except av.error.FFmpegError as e:
      raise ValueError(f'Cannot decode clip {path}: {e}') from e
  audio = None
  if astream is not None:
    audio = (np.concatenate(chunks) if chunks else
             np.zeros([0], np.float32)).astype(np.float32)
  video = None
  if vstream is not None and frames:
    video = _resample_frames(np.stack(frames), np.asarray(times), fps)
  return Clip(audio=audio, video=video, sample_rate=sample_rate, fps=fps)


def _frame_time(frame, index: int, stream) -> float:
  if frame.time is not None:
    return float(frame.time)
  rate = stream.average_rate or stream.guessed_rate or 25
  return index / float(rate)


def _to_rgb(frame, size: Optional[int]) -> np.ndarray:
  """[H, W, 3] uint8, short side resized to `size` then centre-cropped."""
  if size is None:
    return frame.to_ndarray(format='rgb24')
  w, h = frame.width, frame.height
  scale = size / min(w, h)
  nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
  rgb = frame.reformat(width=nw, height=nh, format='rgb24',
                       interpolation='AREA').to_ndarray()
  top, left = (nh - size) // 2, (nw - size) // 2
  return rgb[top:top + size, left:left + size]


def _resample_frames(frames: np.ndarray, times: np.ndarray,
                     fps: float) -> np.ndarray:
  """[F_src, H, W, 3] at `times` -> [F_out, H, W, 3] on the grid k / fps."""
  order = np.argsort(times, kind='stable')  # Decoders may emit out of order.
  frames, times = frames[order], times[order] - times[order][0]
  num_out = int(math.floor(times[-1] * fps + 1e-6)) + 1
  grid = np.arange(num_out) / fps
  idx = np.searchsorted(times, grid + 1e-6, side='right') - 1
  return frames[np.clip(idx, 0, len(frames) - 1)]


def fit_length(x: np.ndarray, length: int, *, pad: str) -> np.ndarray:
  """Trims or pads axis 0 to `length`: pad='zeros' or 'edge' (repeat last)."""
  if len(x) >= length:
    return x[:length]
  if not len(x):
    return np.zeros((length,) + x.shape[1:], x.dtype)
  widths = [(0, length - len(x))] + [(0, 0)] * (x.ndim - 1)
  return np.pad(x, widths, mode='constant' if pad == 'zeros' else 'edge')


# ---------------------------------------------------------------------------
# TFRecord format (one place for writer and reader).


def serialize_example(*, ytid: str, start_seconds: float,
                      labels: Sequence[int], audio: Optional[np.ndarray],
                      video: Optional[np.ndarray], audio_dtype: str = 'int16',
                      video_format: str = 'jpeg',
                      jpeg_quality: int = 90) -> bytes:
  """Serializes one clip to a tf.train.Example.

  Features: 'ytid' (bytes), 'start_seconds' (float), 'labels' (int64 class
  indices), 'audio' (raw little-endian int16 or float32 bytes of the
  [clip_samples] waveform), 'video' (one JPEG per frame, or one raw uint8
  [clip_frames, S, S, 3] buffer).

  Args:
    ytid: YouTube id.
    start_seconds: segment start in the original video.
    labels: class indices.
    audio: float32 [clip_samples] in [-1, 1], or None.
    video: uint8 [clip_frames, S, S, 3], or None.
    audio_dtype: 'int16' (half the size) or 'float32'.
    video_format: 'jpeg' or 'uint8'.
    jpeg_quality: JPEG quality in [1, 100].

  Returns:
    The serialized proto.
  """
  if audio_dtype not in AUDIO_DTYPES:
    raise ValueError(f'audio_dtype={audio_dtype!r} not in {AUDIO_DTYPES}.')
  if video_format not in VIDEO_FORMATS:
    raise ValueError(f'video_format={video_format!r} not in {VIDEO_FORMATS}.')
  feature = {
      'ytid': _bytes_feature([ytid.encode('utf-8')]),
      'start_seconds': tf.train.Feature(
          float_list=tf.train.FloatList(value=[start_seconds])),
      'labels': tf.train.Feature(
          int64_list=tf.train.Int64List(value=list(labels))),
  }
  if audio is not None:
    audio = np.asarray(audio, np.float32)
    if audio_dtype == 'int16':
      audio = np.round(np.clip(audio, -1.0, 32767 / 32768) * 32768)
    feature['audio'] = _bytes_feature(
        [audio.astype('<i2' if audio_dtype == 'int16' else '<f4').tobytes()])
  if video is not None:
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
      raise ValueError(f'video must be uint8 [F, S, S, 3], got {video.dtype} '
                       f'{video.shape}.')
    if video_format == 'jpeg':
      feature['video'] = _bytes_feature(
          [_encode_jpeg(f, jpeg_quality) for f in video])
    else:
      feature['video'] = _bytes_feature([video.tobytes()])
  return tf.train.Example(
      features=tf.train.Features(feature=feature)).SerializeToString()


def _bytes_feature(values: Sequence[bytes]) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
  # PIL (a TensorBoard dependency) rather than TF: preparation workers stay
  # free of TF thread pools and this is several times faster than eager TF.
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(frame).save(buf, format='JPEG', quality=quality)
  return buf.getvalue()


def read_metadata(data_dir: str) -> dict[str, Any]:
  """Reads data_dir/metadata.json written by scripts/prepare_audioset.py.

  Raises:
    FileNotFoundError: if data_dir or the metadata file is missing.
    ValueError: if the metadata is corrupt or of another format version.
  """
  path = os.path.join(data_dir, METADATA_FILE)
  if not data_dir or not os.path.isfile(path):
    raise FileNotFoundError(
        f'No AudioSet TFRecords at data_dir={data_dir!r} ({METADATA_FILE} '
        'missing); run scripts/prepare_audioset.py first.')
  try:
    with open(path, encoding='utf-8') as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'Corrupt {path}: {e}') from e
  if meta.get('format_version') != FORMAT_VERSION:
    raise ValueError(f'{path}: format_version {meta.get("format_version")} '
                     f'!= {FORMAT_VERSION}; re-run prepare_audioset.py.')
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
    return _train_iterator(ds, batch_dims)
  ds = ds.map(lambda r: parse(r, tf.zeros([2], tf.int64)),
              num_parallel_calls=calls, deterministic=True)
  ds = ds.batch(batch_size).prefetch(2)
  num_batches = None
  if process_count > 1:
    shares = _host_share_sizes(files, int(split_meta['written']),
                               process_count)
    num_batches = max(1, -(-max(shares) // batch_size))
  return _eval_iterator(ds, batch_size, batch_dims, num_batches)


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
        spec = log_mel_spectrogram(wave, config)  # [W, frames, bins]
        if is_training and config.specaugment:
          spec = spec_augment(spec[0], seeds[1], config)[None]
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


def log_mel_spectrogram(waveform: tf.Tensor,
                        config: ml_collections.ConfigDict) -> tf.Tensor:
  """Log-mel spectrogram, [..., num_samples] -> [..., frames, bins].

  With the defaults a 61,440-sample window gives [96, 50] (module docstring).
  """
  stft = tf.signal.stft(waveform, frame_length=config.mel_frame_length,
                        frame_step=config.mel_hop_length,
                        fft_length=config.mel_fft_length, pad_end=True)
  weights = tf.signal.linear_to_mel_weight_matrix(
      num_mel_bins=config.mel_num_bins,
      num_spectrogram_bins=config.mel_fft_length // 2 + 1,
      sample_rate=config.sample_rate, lower_edge_hertz=config.mel_lower_hz,
      upper_edge_hertz=config.mel_upper_hz)
  mel = tf.tensordot(tf.abs(stft), weights, axes=1)
  return tf.math.log(mel + config.mel_log_offset)


def spec_augment(spec: tf.Tensor, seed: tf.Tensor,
                 config: ml_collections.ConfigDict) -> tf.Tensor:
  """SpecAugment time and frequency masking of one [frames, bins] array.

  Each mask has a width drawn uniformly from [0, max] and a uniform start;
  masked cells take the spectrogram's mean (its value after mean
  normalisation is 0, as in Park et al. 2019).

  Args:
    spec: float32 [frames, bins].
    seed: int [2] stateless seed.
    config: specaugment_* fields of `default_config`.

  Returns:
    float32 [frames, bins].
  """
  num_t, num_f = spec.shape
  n_f, n_t = (config.specaugment_num_freq_masks,
              config.specaugment_num_time_masks)
  seeds = tf.random.experimental.stateless_split(seed, 2 * (n_f + n_t) + 1)
  keep = tf.ones_like(spec, tf.bool)
  masks = ([(1, num_f, config.specaugment_max_freq_bins)] * n_f +
           [(0, num_t, config.specaugment_max_time_frames)] * n_t)
  for i, (axis, size, max_width) in enumerate(masks):
    width = tf.random.stateless_uniform([], seeds[2 * i], 0, max_width + 1,
                                        tf.int32)
    start = tf.random.stateless_uniform([], seeds[2 * i + 1], 0,
                                        size - width + 1, tf.int32)
    pos = tf.range(size)
    hit = (pos >= start) & (pos < start + width)
    hit = hit[None, :] if axis == 1 else hit[:, None]
    keep &= ~hit
  return tf.where(keep, spec, tf.reduce_mean(spec))


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'Unknown AudioSet split {split!r}; expected {SPLITS}.')


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
    classes = read_classes(os.path.join(config.csv_dir, CLASS_CSV))
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
