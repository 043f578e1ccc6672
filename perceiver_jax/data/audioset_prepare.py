"""AudioSet offline preparation: official CSVs, the user's clips, the format.

AudioSet ships labels, not media: users bring one clip per YouTube id.
`scripts/prepare_audioset.py` reads the official CSVs (`read_classes`,
`read_segments`), finds each segment's clip on disk (`find_clips`), decodes
it ONCE with PyAV (`audio_ops.decode_clip`: audio resampled to 48 kHz mono,
video resampled to 25 fps and resized/centre-cropped to a square), and
writes TFRecord shards plus `metadata.json` (`serialize_example`). Clips
missing from disk are counted, logged and listed, never silently dropped.
The loader (perceiver_jax.data.audioset) reads what this module defines.

Clip files are expected to hold just the 10 s segment (as AudioSet
downloaders cut them), starting at time 0. They are padded (audio with
silence, video by repeating the last frame) or trimmed to prepare_audioset's
--clip_seconds (10 s), so every stored example has the same shape; the
prepare summary counts padded clips.
"""

import csv
import dataclasses
import os
from typing import Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

SPLITS = ('balanced_train', 'unbalanced_train', 'eval')
SEGMENT_CSVS = {
    'balanced_train': 'balanced_train_segments.csv',
    'unbalanced_train': 'unbalanced_train_segments.csv',
    'eval': 'eval_segments.csv',
}
CLASS_CSV = 'class_labels_indices.csv'
METADATA_FILE = 'metadata.json'
FORMAT_VERSION = 1
AUDIO_DTYPES = ('int16', 'float32')
VIDEO_FORMATS = ('jpeg', 'uint8')
# Clip file extensions searched for, in order of preference (containers with
# video first, so an audio-only copy never hides a video).
CLIP_EXTENSIONS = ('.mp4', '.mkv', '.webm', '.mov', '.avi', '.m4a', '.wav',
                   '.flac', '.ogg', '.opus', '.mp3')


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


# ---------------------------------------------------------------------------
# TFRecord format (audioset._make_parser reads what this writes).


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
