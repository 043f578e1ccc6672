r"""AudioSet with the Perceiver: P1 Tab. 3 (mAP), and P2's AudioSet model.

Multi-label (527 classes), sigmoid cross-entropy, evaluated by mAP over the
eval segments (eval averages the scores of 16 overlapping 1.28 s windows
covering each 10 s clip). Model (P1 Sec. 4.3): 2 cross-attends x 8
self-attention blocks, NO weight sharing; 512 x 512 latents (P1 does not
state N, D; P2's AudioSet model uses 512 x 512).

Presets (comma-separated after ':'), each a Table 3 row:
  modality=audio,audio=raw        raw audio: 61,440 samples at 48 kHz as 480
                                  patches of 128 + 1D Fourier features
                                  (480 x 257). Expected 38.3 mAP.
  modality=audio,audio=mel        96 x 50 log-mel spectrogram (4,800 x 131),
                                  SpecAugment. Expected 38.4 mAP.
  modality=video                  32 frames at 224x224 in 2x8x8 space-time
                                  patches (12,544 x 384) + 3D Fourier features
                                  (16 bands): 483 channels. Expected 25.8 mAP.
  modality=audio_video[,audio=…]  fused at the input; learned modality
                                  padding to 487 channels (13,024 inputs raw,
                                  17,344 mel); whole-video dropout p = 0.3.
                                  Expected 43.5 (raw) / 43.2 (mel).
  p2                              P2's AudioSet Perceiver (App. C): raw audio
                                  + video, 1 cross-attend, 12 unshared blocks,
                                  N = D = 512, average-then-project: 21.0M.
  debug                           tiny model on tiny windows (4 frames =
                                  0.16 s, 16x16 video, 16 mel bins) of the
                                  committed fixture (tests/testdata/audioset,
                                  4 classes); seed=N.

  python scripts/prepare_audioset.py --csv_dir=CSVS --clip_dir=CLIPS \
      --output_dir=/path/to/tfrecords
  python scripts/train.py --config=configs/audioset.py:modality=audio_video \
      --config.experiment_kwargs.config.data.data_dir=/path/to/tfrecords

The debug preset reads /tmp/perceiver_jax/audioset_debug, prepared once from
the fixture with
  python scripts/prepare_audioset.py --csv_dir=tests/testdata/audioset \
      --clip_dir=tests/testdata/audioset/clips --video_size=16 \
      --output_dir=/tmp/perceiver_jax/audioset_debug

The data section holds every field of perceiver_jax/data/audioset.py's
`default_config()` (documented there) with its default, kept as literals so
that loading a config does not import TensorFlow; `input_shape` (for
scripts/model_summary.py) is derived from them when the config is built.

Deviations: P1 does not give AudioSet's optimizer; we use ImageNet's LAMB
(4e-3, weight decay 0.1, clip 10) with constant-then-cosine over 100 epochs
of the unbalanced training set, batch 512. Audio Fourier bands (64, max
resolution 480) and the mel parameters are our choices; see the data module.

Precision: training.precision='auto', bfloat16 compute with float32
parameters, softmax and LayerNorm statistics on GPU and TPU, float32 on
CPU ('float32' or 'bfloat16' force one).
"""

import math
import os
from typing import Any, Optional

from configs import common
import ml_collections

NUM_CLASSES = 527
NUM_TRAIN = 2_042_985  # unbalanced_train_segments.csv
_FIXTURE = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'tests', 'testdata', 'audioset')
FIXTURE_NUM_CLASSES = 4  # tests/testdata/audioset/class_labels_indices.csv
FIXTURE_NUM_TRAIN = 8  # Its balanced_train_segments.csv.
DEBUG_DATA_DIR = '/tmp/perceiver_jax/audioset_debug'


def audioset_data(modality: str, audio: str,
                  debug: bool = False) -> ml_collections.ConfigDict:
  """The data section: the loader's fields (+ splits, sizes, input_shape).

  Args:
    modality: 'audio', 'video' or 'audio_video'.
    audio: audio representation, 'raw' or 'mel'.
    debug: tiny windows of the committed fixture's 4 classes.

  Returns:
    An unlocked ConfigDict.
  """
  data = ml_collections.ConfigDict(dict(
      name='audioset', train_split='unbalanced_train', eval_split='eval',
      num_train_examples=NUM_TRAIN, num_classes=NUM_CLASSES,
      # The loader's default_config(), same names and values.
      data_dir='', csv_dir='', modality=modality,
      audio_representation=audio, sample_rate=48_000, window_seconds=1.28,
      num_eval_windows=16, video_size=224, num_frames=32, fps=25,
      mel_num_bins=50, mel_frame_length=1280, mel_hop_length=640,
      mel_fft_length=2048, mel_lower_hz=20.0, mel_upper_hz=24_000.0,
      mel_log_offset=1e-6, specaugment=True, specaugment_num_freq_masks=2,
      specaugment_max_freq_bins=8, specaugment_num_time_masks=2,
      specaugment_max_time_frames=16, shuffle_buffer=256,
      num_parallel_calls=-1))
  if debug:
    # 4 frames at 25 fps = 0.16 s = 7,680 samples: 60 audio patches,
    # 12 x 16 mel, 2 x 2 x 2 video patches. 16 eval windows as in P1.
    data.update(dict(
        train_split='balanced_train', num_train_examples=FIXTURE_NUM_TRAIN,
        num_classes=FIXTURE_NUM_CLASSES, data_dir=DEBUG_DATA_DIR,
        csv_dir=_FIXTURE, window_seconds=0.16, num_frames=4, video_size=16,
        mel_num_bins=16, specaugment_max_freq_bins=4,
        specaugment_max_time_frames=4, shuffle_buffer=8,
        num_parallel_calls=2))
  data.input_shape = input_shapes(data)
  return data


def window_samples(data: ml_collections.ConfigDict) -> int:
  """Audio samples per window (audioset.window_samples): 61,440."""
  return int(round(data.window_seconds * data.sample_rate))


def input_shapes(data: ml_collections.ConfigDict) -> dict[str, tuple]:
  """Per-example model inputs (no batch axis) of a data section."""
  shapes = {}
  if data.modality in ('audio', 'audio_video'):
    samples = window_samples(data)
    if data.audio_representation == 'raw':
      shapes['audio'] = (samples,)
    else:  # pad_end=True STFT frames, as audioset.spectrogram_shape.
      shapes['spectrogram'] = (math.ceil(samples / data.mel_hop_length),
                               data.mel_num_bins)
  if data.modality in ('video', 'audio_video'):
    shapes['video'] = (data.num_frames, data.video_size, data.video_size, 3)
  return shapes


def _audio_preprocessor(representation: str,
                        shape: tuple[int, ...]) -> dict[str, Any]:
  if representation == 'raw':
    patches = shape[0] // 128
    return dict(type='audio', input_key='audio', samples_per_patch=128,
                num_freq_bands=64, max_resolution=patches)
  return dict(type='spectrogram', input_key='spectrogram', patch_shape=(1, 1),
              num_freq_bands=32, max_resolution=shape)


def _video_preprocessor() -> dict[str, Any]:
  return dict(type='video', input_key='video', patch_shape=(2, 8, 8),
              num_freq_bands=16)


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  """The config of the presets in `arg` (module docstring)."""
  options = common.parse_arg(arg, modality='audio_video', audio='raw',
                             p2=False, debug=False, seed=0)
  if options.modality not in ('audio', 'video', 'audio_video'):
    raise ValueError("modality must be 'audio', 'video' or 'audio_video', "
                     f'got {options.modality!r}.')
  if options.audio not in ('raw', 'mel'):
    raise ValueError(f"audio must be 'raw' or 'mel', got {options.audio!r}.")
  if options.p2:
    options.modality, options.audio = 'audio_video', 'raw'

  num_latents = latent_dim = 512
  batch_size, training_steps = 512, 100 * NUM_TRAIN // 512
  if options.debug:
    num_latents, latent_dim = 8, 16
    batch_size, training_steps = 8, 4

  data = audioset_data(options.modality, options.audio, options.debug)
  shapes = data.input_shape
  audio_key = 'audio' if options.audio == 'raw' else 'spectrogram'
  video = _video_preprocessor()
  if options.modality == 'audio':
    preprocessor = _audio_preprocessor(options.audio, shapes[audio_key])
  elif options.modality == 'video':
    preprocessor = video
  else:
    preprocessor = dict(
        type='multimodal', min_padding_size=4,
        modality_dropout={'video': 0.3},
        modalities={audio_key: _audio_preprocessor(options.audio,
                                                   shapes[audio_key]),
                    'video': video})

  encoder = dict(
      num_latents=num_latents, latent_dim=latent_dim, num_cross_attends=2,
      num_self_attends_per_block=8, num_cross_heads=1,
      num_self_heads=2 if options.debug else 8,
      cross_widening_factor=1, self_widening_factor=1,
      share_cross_attends=False, share_latent_transformer=False,
      dropout_prob=0.0, **common.efficiency_options())
  if options.p2:
    encoder.update(num_cross_attends=1, num_blocks=1,
                   num_self_attends_per_block=12)
  if options.debug:
    encoder.update(num_self_attends_per_block=1)

  experiment = ml_collections.ConfigDict(dict(
      experiment='multilabel', data=data,
      model=dict(preprocessor=preprocessor, encoder=encoder,
                 decoder=dict(type='average', num_classes=data.num_classes),
                 backend='auto'),
      optimizer=common.optimizer(
          name='lamb', base_lr=4e-3, weight_decay=0.1, clip_grad_norm=10.0,
          schedule='constant_cosine', constant_fraction=0.5),
      training=dict(batch_size=batch_size, label_smoothing=0.0,
                    precision='auto', data_seed=options.seed,
                    log_every_steps=100, total_steps=training_steps),
      evaluation=dict(batch_size=batch_size, per_class_metrics=False),
  ))
  name = f'audioset_{options.modality}_{options.audio}'
  if options.debug:
    name += '_debug'
  config = common.jaxline_config(
      experiment=experiment, training_steps=training_steps,
      checkpoint_dir=f'/tmp/perceiver_jax/{name}', best_metric='mAP',
      save_checkpoint_interval=2000, log_interval=100)
  config.random_seed = options.seed
  exp = config.experiment_kwargs.config
  exp.training.total_steps = config.get_ref('training_steps')
  config.lock()
  return config
