"""Audio (and clip) signal ops for AudioSet: decoding, lengths, log-mel.

Two kinds of op live here, kept apart from the loader and the preparation
script so that each can be tested on its own:

  * NumPy/PyAV ops used once, offline, by scripts/prepare_audioset.py:
    `decode_clip` decodes a clip file to mono audio at a fixed rate and, for
    a clip with a video track, frames resampled to a fixed rate and centre-
    cropped to a square (the two streams are decoded in one demux pass);
    `fit_length` pads or trims either to the stored clip length.
  * TensorFlow ops run inside the tf.data loader (perceiver_jax.data.
    audioset): `log_mel_spectrogram` and `spec_augment`.

Mel spectrogram (P1 states only "4,800 inputs" after flattening; parameters
are ours): 50 mel bins (20 Hz - 24 kHz) of the STFT magnitude with a 1,280
sample (26.7 ms) Hann window, 640 sample (13.3 ms) hop and 2,048-point FFT,
`pad_end=True`, so a 61,440-sample window gives 61,440 / 640 = 96 frames and
96 frames x 50 bins = 4,800 inputs; then log(mel + 1e-6). Training applies
SpecAugment (Park et al. 2019): two frequency masks of up to 8 bins and two
time masks of up to 16 frames, filled with the example's mean log-mel value.
The parameters are the mel_* and specaugment_* fields of
perceiver_jax.data.audioset.default_config.
"""

import dataclasses
import math
import os
from typing import Optional

import ml_collections
import numpy as np
import tensorflow as tf


# ---------------------------------------------------------------------------
# Offline decoding (PyAV).


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
# Spectrogram ops (tf.data).


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
    config: specaugment_* fields of `audioset.default_config`.

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

