r"""Builds the small, real audio-visual AudioSet test fixture.

  python scripts/make_audioset_fixture.py [--output_dir=tests/testdata/audioset]

Needs espeak-ng (`apt-get install -y espeak-ng`) and PyAV (`pip install av`).

Four classes with fake mids /m/fx000../m/fx003 named 'zero'..'three'. Each
clip says its digit words aloud (espeak-ng, varied voice/speed/pitch) while
the same handwritten digits (scikit-learn's bundled 8x8 digits, scaled up)
drift across a 64x64 frame, so both modalities carry the class. Clips with
two labels alternate two words and show two digits, exercising the quoted
multi-label CSV field.

Layout, exactly like a user's AudioSet directory:
  class_labels_indices.csv, balanced_train_segments.csv, eval_segments.csv,
  unbalanced_train_segments.csv (official format, 3 `#` header lines)
  clips/<YTID>.mp4        H.264 + AAC (22.05 kHz mono)
  clips/<YTID>_<start>.mkv  MPEG-4 part 2 + MP3 (the `_30.000` name variant)
  clips/<YTID>.flac       audio only (no video stream)
Splits: balanced_train 8 clips (one only 8 s long, to exercise padding),
eval 6 clips + 1 row whose clip is missing on disk, unbalanced_train 4 clips
(one audio-only). All other clips last the full 10 s, at 64x64, 25 fps and
low bitrate so the whole fixture stays near 1 MB. The output is
deterministic for a given espeak-ng / FFmpeg build.
"""

import argparse
import dataclasses
import os
import shutil
import subprocess
import tempfile
import wave

import numpy as np
from sklearn import datasets

NAMES = ('zero', 'one', 'two', 'three')
MIDS = tuple(f'/m/fx{i:03d}' for i in range(len(NAMES)))
FRAME = 64  # Video side.
DIGIT = 24  # Side of one digit sprite.
FPS = 25
AUDIO_RATE = 22_050  # espeak-ng's native rate; the loader resamples to 48k.
SEED = 2021
_YTID_CHARS = ('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'
               '0123456789-_')


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  split: str
  labels: tuple[int, ...]
  kind: str = 'mp4'  # 'mp4', 'mkv' (named <YTID>_<start>) or 'flac'.
  seconds: float = 10.0
  on_disk: bool = True


CLIPS = (
    ClipSpec('balanced_train', (0,)),
    ClipSpec('balanced_train', (1,), 'mkv'),
    ClipSpec('balanced_train', (2,)),
    ClipSpec('balanced_train', (3,), seconds=8.0),
    ClipSpec('balanced_train', (0, 2)),
    ClipSpec('balanced_train', (1,)),
    ClipSpec('balanced_train', (3,), 'mkv'),
    ClipSpec('balanced_train', (1, 3)),
    ClipSpec('eval', (0,)),
    ClipSpec('eval', (1,)),
    ClipSpec('eval', (2,), 'mkv'),
    ClipSpec('eval', (3,)),
    ClipSpec('eval', (2,), on_disk=False),
    ClipSpec('eval', (0, 1)),
    ClipSpec('eval', (2, 3)),
    ClipSpec('unbalanced_train', (0,)),
    ClipSpec('unbalanced_train', (2,), 'mkv'),
    ClipSpec('unbalanced_train', (1, 2)),
    ClipSpec('unbalanced_train', (3,), 'flac'),
)
SEGMENT_CSVS = {
    'balanced_train': 'balanced_train_segments.csv',
    'eval': 'eval_segments.csv',
    'unbalanced_train': 'unbalanced_train_segments.csv',
}


def speak(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
  """int16 [n] at 22.05 kHz: `word` spoken by espeak-ng."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'w.wav')
    subprocess.run(['espeak-ng', '-w', path, '-v', voice, '-s', str(speed),
                    '-p', str(pitch), word], check=True)
    with wave.open(path) as w:
      if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (
          AUDIO_RATE, 1, 2):
        raise RuntimeError(f'Unexpected espeak-ng output format: {path}.')
      pcm = np.frombuffer(w.readframes(w.getnframes()), '<i2')
  nonzero = np.flatnonzero(np.abs(pcm) > 64)
  return pcm[nonzero[0]:nonzero[-1] + 1] if len(nonzero) else pcm


def make_audio(labels, seconds, rng) -> np.ndarray:
  """int16 [seconds * 22050]: the label words, alternating, with pauses."""
  voice = rng.choice(['en+m3', 'en+f2', 'en-us+m1', 'en+f4', 'en-gb+m5'])
  words = [speak(NAMES[i], voice, int(rng.integers(140, 200)),
                 int(rng.integers(30, 70))) for i in labels]
  total = int(seconds * AUDIO_RATE)
  out = np.zeros([total], np.int16)
  pos, k = int(rng.uniform(0.05, 0.3) * AUDIO_RATE), 0
  while pos < total:
    w = words[k % len(words)]
    n = min(len(w), total - pos)
    out[pos:pos + n] = w[:n]
    pos += n + int(rng.uniform(0.25, 0.6) * AUDIO_RATE)
    k += 1
  return out


def make_video(labels, seconds, rng, digits) -> np.ndarray:
  """uint8 [frames, 64, 64, 3]: each label's digit bouncing around."""
  num = int(round(seconds * FPS))
  sprites = []
  for i in labels:
    img = digits.images[rng.choice(np.flatnonzero(digits.target == i))]
    big = np.kron(img / 16.0, np.ones([DIGIT // 8, DIGIT // 8]))
    colour = rng.uniform(0.5, 1.0, size=3)
    sprites.append(big[..., None] * colour)  # [24, 24, 3]
  pos = rng.uniform(0, FRAME - DIGIT, size=(len(labels), 2))
  vel = rng.uniform(0.6, 1.6, size=(len(labels), 2)) * rng.choice(
      [-1, 1], size=(len(labels), 2))
  frames = np.zeros([num, FRAME, FRAME, 3], np.float32)
  for t in range(num):
    for s, sprite in enumerate(sprites):
      y, x = (int(v) for v in pos[s])
      region = frames[t, y:y + DIGIT, x:x + DIGIT]
      np.maximum(region, sprite, out=region)
    pos += vel
    for s in range(len(sprites)):  # Bounce off the walls.
      for d in range(2):
        if not 0 <= pos[s, d] <= FRAME - DIGIT:
          vel[s, d] *= -1
          pos[s, d] = np.clip(pos[s, d], 0, FRAME - DIGIT)
  return np.round(frames * 255).astype(np.uint8)


def write_clip(path, kind, audio, video) -> None:
  """Muxes int16 audio [n] (+ uint8 video [F, 64, 64, 3]) with PyAV."""
  import av  # pylint: disable=g-import-not-at-top
  vcodec, acodec = {'mp4': ('libx264', 'aac'), 'mkv': ('mpeg4', 'libmp3lame'),
                    'flac': (None, 'flac')}[kind]
  # bitexact: no random Matroska UIDs or dates, so rebuilds are identical.
  with av.open(path, 'w', container_options={'fflags': '+bitexact'}) as out:
    out.metadata.clear()
    vs = None
    if vcodec is not None:
      vs = out.add_stream(vcodec, rate=FPS)
      vs.width = vs.height = FRAME
      vs.pix_fmt = 'yuv420p'
      vs.thread_count = 1  # Deterministic output.
      if vcodec == 'libx264':
        vs.options = {'crf': '30', 'preset': 'slow',
                      'x264-params': 'threads=1:lookahead-threads=1'}
      else:
        vs.bit_rate = 48_000
    as_ = out.add_stream(acodec, rate=AUDIO_RATE)
    as_.layout = 'mono'
    if acodec != 'flac':
      as_.bit_rate = 24_000
    chunk = 2048
    for i in range(0, len(audio), chunk):
      frame = av.AudioFrame.from_ndarray(audio[None, i:i + chunk],
                                         format='s16', layout='mono')
      frame.sample_rate = AUDIO_RATE
      frame.pts = i
      out.mux(as_.encode(frame))
    out.mux(as_.encode(None))
    if vs is not None:
      for t, img in enumerate(video):
        frame = av.VideoFrame.from_ndarray(img, format='rgb24')
        frame.pts = t
        out.mux(vs.encode(frame))
      out.mux(vs.encode(None))


def make_ytids(n, rng) -> list[str]:
  ids = [''.join(rng.choice(list(_YTID_CHARS), size=11)) for _ in range(n)]
  ids[0] = '-' + ids[0][1:]  # Real ids may start with '-' ...
  ids[1] = ids[1][:5] + '_' + ids[1][6:]  # ... and contain '_'.
  return ids


def build(output_dir: str) -> dict[str, int]:
  """Writes the fixture into `output_dir` (replacing it); returns counts."""
  rng = np.random.default_rng(SEED)
  digits = datasets.load_digits()
  if os.path.isdir(output_dir):
    shutil.rmtree(output_dir)
  clip_dir = os.path.join(output_dir, 'clips')
  os.makedirs(clip_dir)
  with open(os.path.join(output_dir, 'class_labels_indices.csv'), 'w',
            encoding='utf-8') as f:
    f.write('index,mid,display_name\n')
    for i, (mid, name) in enumerate(zip(MIDS, NAMES)):
      f.write(f'{i},{mid},"{name}"\n')
  rows = {split: [] for split in SEGMENT_CSVS}
  for spec, ytid in zip(CLIPS, make_ytids(len(CLIPS), rng)):
    start = float(rng.integers(0, 30) * 10)
    rows[spec.split].append(
        f'{ytid}, {start:.3f}, {start + 10:.3f}, '
        f'"{",".join(MIDS[i] for i in spec.labels)}"')
    audio = make_audio(spec.labels, spec.seconds, rng)
    video = make_video(spec.labels, spec.seconds, rng, digits)
    if not spec.on_disk:
      continue
    name = ytid + (f'_{start:.3f}' if spec.kind == 'mkv' else '')
    write_clip(os.path.join(clip_dir, f'{name}.{spec.kind}'), spec.kind,
               audio, video)
  for split, lines in rows.items():
    labels = {m for line in lines for m in line.split('"')[1].split(',')}
    num_pos = sum(len(line.split('"')[1].split(',')) for line in lines)
    with open(os.path.join(output_dir, SEGMENT_CSVS[split]), 'w',
              encoding='utf-8') as f:
      f.write('# Segments csv created by scripts/make_audioset_fixture.py\n')
      f.write(f'# num_ytids={len(lines)}, num_segs={len(lines)}, '
              f'num_unique_labels={len(labels)}, '
              f'num_positive_labels={num_pos}\n')
      f.write('# YTID, start_seconds, end_seconds, positive_labels\n')
      f.write('\n'.join(lines) + '\n')
  return {split: len(lines) for split, lines in rows.items()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
      '--output_dir', default=os.path.join(
          os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
          'tests', 'testdata', 'audioset'))
  args = parser.parse_args(argv)
  counts = build(args.output_dir)
  size = sum(os.path.getsize(os.path.join(r, f))
             for r, _, fs in os.walk(args.output_dir) for f in fs)
  print(f'Wrote {counts} rows, {size / 1e6:.2f} MB, to {args.output_dir}')


if __name__ == '__main__':
  main()
