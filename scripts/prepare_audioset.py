r"""Converts the user's AudioSet clips + official CSVs into TFRecord shards.

  python scripts/prepare_audioset.py --csv_dir=CSVS --clip_dir=CLIPS \
      --output_dir=TFRECORDS [--splits=balanced_train,eval] \
      [--video_size=224 --video_format=jpeg --audio_dtype=int16] \
      [--modalities=audio,video --num_workers=8]

Runs once, so that training never decodes video: every clip found under
--clip_dir (named `<YTID>.<ext>`, `<YTID>_<start>.<ext>` or
`<YTID>_<start>_<end>.<ext>`, see
perceiver_jax.data.audioset_prepare.clip_stems) is decoded with PyAV to
48 kHz mono audio and 25 fps square frames, padded or trimmed to
--clip_seconds, and written to
`OUTPUT_DIR/<split>-<NNNNN>.tfrecord` (--examples_per_shard per file) with
`OUTPUT_DIR/metadata.json` describing the storage format. Splits can be
prepared in separate runs into the same directory if the storage flags agree.

CSV rows whose clip is not on disk are counted, logged and listed in
`<split>-missing.txt`; clips that cannot be used (corrupt, or lacking a
stream named in --modalities) in `<split>-unusable.txt`. A JSON summary
(rows, found, missing, unusable, padded, written per split) goes to stdout.

Storage per 10 s clip at the defaults: 0.96 MB of int16 audio plus 250 JPEG
frames at 224x224 (~2-3 MB).
"""

import argparse
import concurrent.futures
import glob
import json
import multiprocessing
import os
import sys
from typing import Any, Optional, Sequence

from absl import logging
import tensorflow as tf

from perceiver_jax.data import audio_ops
from perceiver_jax.data import audioset
from perceiver_jax.data import audioset_prepare

_LISTED = 20  # Ids listed in the JSON summary; the .txt files list all.


def prepare(*, csv_dir: str, clip_dir: str, output_dir: str,
            splits: Sequence[str] = ('balanced_train', 'eval'),
            modalities: Sequence[str] = ('audio', 'video'),
            sample_rate: int = 48_000, fps: int = 25,
            clip_seconds: float = 10.0, video_size: Optional[int] = 224,
            video_format: str = 'jpeg', audio_dtype: str = 'int16',
            jpeg_quality: int = 90, examples_per_shard: int = 1024,
            num_workers: int = 1) -> dict[str, Any]:
  """Writes TFRecord shards + metadata.json; returns the summary.

  Args:
    csv_dir: directory holding class_labels_indices.csv and the segment CSVs.
    clip_dir: the user's clip directory (searched recursively).
    output_dir: where shards and metadata go (created if needed).
    splits: subset of audioset_prepare.SPLITS.
    modalities: streams to store, subset of ('audio', 'video'); clips lacking
      one are reported as unusable.
    sample_rate: audio rate in Hz.
    fps: video frame rate; sample_rate must be a multiple of it.
    clip_seconds: every clip is padded/trimmed to this length.
    video_size: stored square frame side.
    video_format: 'jpeg' (small) or 'uint8' (raw, fastest to read).
    audio_dtype: 'int16' or 'float32'.
    jpeg_quality: JPEG quality in [1, 100].
    examples_per_shard: records per TFRecord file.
    num_workers: decoding processes (1 = in this process).

  Returns:
    {'output_dir': ..., 'splits': {split: {'rows', 'found', 'missing',
    'unusable', 'padded', 'written', 'files', 'missing_ytids',
    'unusable_ytids'}}}; the id lists hold at most 20 entries.

  Raises:
    FileNotFoundError: for a missing CSV or clip directory.
    ValueError: for bad settings, malformed CSVs, or metadata in output_dir
      written with other storage settings.
  """
  splits, modalities = list(splits), sorted(set(modalities))
  for split in splits:
    if split not in audioset_prepare.SPLITS:
      raise ValueError(
          f'Unknown split {split!r}; expected {audioset_prepare.SPLITS}.')
  if not modalities or not set(modalities) <= {'audio', 'video'}:
    raise ValueError(f'modalities={modalities} must be a non-empty subset of '
                     "('audio', 'video').")
  if sample_rate <= 0 or fps <= 0 or sample_rate % fps:
    raise ValueError(f'sample_rate={sample_rate} must be a positive multiple '
                     f'of fps={fps}.')
  clip_frames = clip_seconds * fps
  if clip_seconds <= 0 or abs(clip_frames - round(clip_frames)) > 1e-6:
    raise ValueError(f'clip_seconds={clip_seconds} must be a positive whole '
                     f'number of frames at fps={fps}.')
  if video_size is not None and video_size <= 0:
    raise ValueError(f'video_size={video_size} must be positive.')
  if not 1 <= jpeg_quality <= 100:
    raise ValueError(f'jpeg_quality={jpeg_quality} not in [1, 100].')
  if examples_per_shard < 1 or num_workers < 1:
    raise ValueError(f'examples_per_shard={examples_per_shard} and '
                     f'num_workers={num_workers} must be positive.')
  if audio_dtype not in audioset_prepare.AUDIO_DTYPES:
    raise ValueError(f'audio_dtype={audio_dtype!r} not in '
                     f'{audioset_prepare.AUDIO_DTYPES}.')
  if video_format not in audioset_prepare.VIDEO_FORMATS:
    raise ValueError(f'video_format={video_format!r} not in '
                     f'{audioset_prepare.VIDEO_FORMATS}.')

  classes = audioset_prepare.read_classes(
      os.path.join(csv_dir, audioset_prepare.CLASS_CSV))
  segments = {s: audioset_prepare.read_segments(
      os.path.join(csv_dir, audioset_prepare.SEGMENT_CSVS[s]), classes)
              for s in splits}  # Parse all CSVs before the slow part.
  clip_index = audioset_prepare.index_clip_dir(clip_dir)
  os.makedirs(output_dir, exist_ok=True)
  storage = dict(
      format_version=audioset_prepare.FORMAT_VERSION,
      classes=[dict(index=i, mid=m, display_name=n) for i, (m, n) in
               enumerate(zip(classes.mids, classes.display_names))],
      modalities=modalities, sample_rate=sample_rate, fps=fps,
      clip_seconds=clip_seconds,
      clip_samples=int(round(clip_seconds * sample_rate)),
      clip_frames=int(round(clip_frames)),
      video_size=video_size if 'video' in modalities else None,
      video_format=video_format, audio_dtype=audio_dtype)
  meta = _merge_metadata(output_dir, storage)
  settings = dict(storage, jpeg_quality=jpeg_quality)

  summary = {'output_dir': output_dir, 'splits': {}}
  for split in splits:
    found, missing = audioset_prepare.find_clips(segments[split], clip_index)
    if missing:
      logging.warning('%s: %d of %d clips missing from %s (listed in '
                      '%s-missing.txt).', split, len(missing),
                      len(segments[split]), clip_dir, split)
    result = _write_split(split, found, output_dir, settings,
                          examples_per_shard, num_workers)
    _write_list(os.path.join(output_dir, f'{split}-missing.txt'),
                [f'{s.ytid},{s.start},{s.end}' for s in missing])
    _write_list(os.path.join(output_dir, f'{split}-unusable.txt'),
                [f'{y},{why}' for y, why in result.pop('unusable_list')])
    split_summary = dict(
        rows=len(segments[split]), found=len(found), missing=len(missing),
        **result, missing_ytids=[s.ytid for s in missing[:_LISTED]])
    summary['splits'][split] = split_summary
    meta['splits'][split] = {k: v for k, v in split_summary.items()
                             if not k.endswith('_ytids')}
    _save_metadata(output_dir, meta)  # After each split: partial runs count.
  return summary


def _merge_metadata(output_dir, storage):
  """Existing metadata must describe the same storage format."""
  path = os.path.join(output_dir, audioset_prepare.METADATA_FILE)
  if not os.path.exists(path):
    return dict(storage, splits={})
  meta = audioset.read_metadata(output_dir)
  diff = {k: (meta.get(k), v) for k, v in storage.items() if meta.get(k) != v}
  if diff:
    raise ValueError(
        f'{path} was written with other settings {sorted(diff)} '
        f'(existing, requested) = {list(diff.values())[:3]}; use another '
        '--output_dir or the same flags.')
  return meta


def _save_metadata(output_dir, meta):
  path = os.path.join(output_dir, audioset_prepare.METADATA_FILE)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(meta, f, indent=1)
  os.replace(path + '.tmp', path)


def _write_list(path, lines):
  with open(path, 'w', encoding='utf-8') as f:
    f.write(''.join(line + '\n' for line in lines))


def _write_split(split, found, output_dir, settings, examples_per_shard,
                 num_workers):
  """Decodes `found` clips and writes them; returns counts and file names."""
  for old in glob.glob(os.path.join(output_dir, f'{split}-*.tfrecord')):
    os.remove(old)
  jobs = [(seg.ytid, seg.start_seconds, seg.labels, path, settings)
          for seg, path in found]
  files, unusable, written, padded = [], [], 0, 0
  writer = None
  for ytid, status, payload, was_padded in _run(jobs, num_workers):
    if status != 'ok':
      logging.warning('%s: clip %s unusable: %s', split, ytid, payload)
      unusable.append((ytid, payload))
      continue
    if writer is None or written % examples_per_shard == 0:
      if writer is not None:
        writer.close()
      files.append(f'{split}-{len(files):05d}.tfrecord')
      writer = tf.io.TFRecordWriter(os.path.join(output_dir, files[-1]))
    writer.write(payload)
    written += 1
    padded += was_padded
    if written % 1000 == 0:
      logging.info('%s: %d / %d clips written.', split, written, len(jobs))
  if writer is not None:
    writer.close()
  return dict(unusable=len(unusable), padded=padded, written=written,
              files=files, unusable_ytids=[y for y, _ in unusable[:_LISTED]],
              unusable_list=unusable)


def _run(jobs, num_workers):
  """Yields _convert(job) in order, holding a bounded number in flight."""
  if num_workers == 1:
    yield from map(_convert, jobs)
    return
  context = multiprocessing.get_context('spawn')  # Safe next to TF threads.
  with concurrent.futures.ProcessPoolExecutor(num_workers,
                                              mp_context=context) as pool:
    chunk = 16 * num_workers
    for i in range(0, len(jobs), chunk):
      yield from pool.map(_convert, jobs[i:i + chunk], chunksize=4)


def _convert(job):
  """(ytid, status 'ok'|reason, serialized example|reason, padded)."""
  ytid, start_seconds, labels, path, s = job
  want_audio, want_video = 'audio' in s['modalities'], 'video' in s[
      'modalities']
  try:
    clip = audio_ops.decode_clip(
        path, sample_rate=s['sample_rate'], fps=s['fps'],
        video_size=s['video_size'], with_audio=want_audio,
        with_video=want_video)
  except (ValueError, OSError) as e:
    return ytid, 'error', f'decode failed: {e}', False
  if want_audio and (clip.audio is None or not len(clip.audio)):
    return ytid, 'error', f'no audio stream in {path}', False
  if want_video and clip.video is None:
    return ytid, 'error', f'no video stream in {path}', False
  # Short by more than one video frame counts as padded.
  tolerance = s['sample_rate'] // s['fps']
  padded = False
  audio = video = None
  if want_audio:
    padded |= len(clip.audio) < s['clip_samples'] - tolerance
    audio = audio_ops.fit_length(clip.audio, s['clip_samples'], pad='zeros')
  if want_video:
    padded |= len(clip.video) < s['clip_frames'] - 1
    video = audio_ops.fit_length(clip.video, s['clip_frames'], pad='edge')
  example = audioset_prepare.serialize_example(
      ytid=ytid, start_seconds=start_seconds, labels=labels, audio=audio,
      video=video, audio_dtype=s['audio_dtype'],
      video_format=s['video_format'], jpeg_quality=s['jpeg_quality'])
  return ytid, 'ok', example, padded


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n', maxsplit=1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument('--csv_dir', required=True)
  parser.add_argument('--clip_dir', required=True)
  parser.add_argument('--output_dir', required=True)
  parser.add_argument('--splits', default='balanced_train,eval',
                      help='comma-separated subset of '
                      f'{audioset_prepare.SPLITS}')
  parser.add_argument('--modalities', default='audio,video')
  parser.add_argument('--sample_rate', type=int, default=48_000)
  parser.add_argument('--fps', type=int, default=25)
  parser.add_argument('--clip_seconds', type=float, default=10.0)
  parser.add_argument('--video_size', type=int, default=224)
  parser.add_argument('--video_format', default='jpeg',
                      choices=audioset_prepare.VIDEO_FORMATS)
  parser.add_argument('--audio_dtype', default='int16',
                      choices=audioset_prepare.AUDIO_DTYPES)
  parser.add_argument('--jpeg_quality', type=int, default=90)
  parser.add_argument('--examples_per_shard', type=int, default=1024)
  parser.add_argument('--num_workers', type=int, default=1)
  args = parser.parse_args(argv)
  summary = prepare(
      csv_dir=args.csv_dir, clip_dir=args.clip_dir,
      output_dir=args.output_dir, splits=_split_list(args.splits),
      modalities=_split_list(args.modalities), sample_rate=args.sample_rate,
      fps=args.fps, clip_seconds=args.clip_seconds,
      video_size=args.video_size, video_format=args.video_format,
      audio_dtype=args.audio_dtype, jpeg_quality=args.jpeg_quality,
      examples_per_shard=args.examples_per_shard,
      num_workers=args.num_workers)
  json.dump(summary, sys.stdout, indent=1)
  sys.stdout.write('\n')
  return summary


def _split_list(text):
  return [x.strip() for x in text.split(',') if x.strip()]


if __name__ == '__main__':
  main()
