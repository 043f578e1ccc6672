r"""AudioSet with the Perceiver: P1 Tab. 3 (mAP), and P2's AudioSet model.

Multi-label (527 classes), sigmoid cross-entropy, evaluated by mAP over the
eval segments (eval averages the scores of 16 overlapping 1.28 s windows
covering each 10 s clip). Model (P1 Sec. 4.3): 2 cross-attends x 8
self-attention blocks, NO weight sharing; 512 x 512 latents (P1 does not
state N, D; P2's AudioSet model uses 512 x 512).

Presets (comma-separated after ':'), each a Table 3 row:
  modality=audio,audio=raw        raw audio: 61,440 samples at 48 kHz as 480
                                  patches of 128 + 1D Fourier features.
                                  Expected 38.3 mAP.
  modality=audio,audio=mel        mel spectrogram (4,800 inputs), SpecAugment.
                                  Expected 38.4 mAP.
  modality=video                  32 frames at 224x224 in 2x8x8 space-time
                                  patches (12,544 x 384) + 3D Fourier features
                                  (16 bands): 483 channels. Expected 25.8 mAP.
  modality=audio_video[,audio=…]  fused at the input; learned modality
                                  padding to 487 channels; whole-video dropout
                                  p = 0.3. Expected 43.5 (raw) / 43.2 (mel).
  p2                              P2's AudioSet Perceiver (App. C): raw audio
                                  + video, 1 cross-attend, 12 unshared blocks,
                                  N = D = 512, average-then-project: 21.0M.
  debug                           tiny model and clips (tests), seed=N.

  python scripts/prepare_audioset.py --csv_dir=... --clips_dir=... --output_dir=...
  python scripts/train.py --config=configs/audioset.py:modality=audio_video \
      --config.experiment_kwargs.config.data.data_dir=/path/to/tfrecords

Deviations: P1 does not give AudioSet's optimizer; we use ImageNet's LAMB
(4e-3, weight decay 0.1, clip 10) with constant-then-cosine over 100 epochs
of the unbalanced training set, batch 512. Audio Fourier bands (64, max
resolution 480) and the mel layout are our choices; see the data module.
"""

import os
from typing import Optional

from configs import common
import ml_collections

NUM_CLASSES = 527
NUM_TRAIN = 2_042_985  # unbalanced_train_segments.csv
MEL_FRAMES, MEL_BINS = 96, 50  # 4,800 inputs per 1.28 s window.
_FIXTURE = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'tests', 'testdata', 'audioset')


def _audio(representation: str, num_samples: int,
           mel_shape: tuple[int, int]) -> tuple[dict, tuple[int, ...]]:
  """(preprocessor section, per-example input shape) of the audio input."""
  if representation == 'raw':
    patches = num_samples // 128
    return (dict(type='audio', input_key='audio', samples_per_patch=128,
                 num_freq_bands=64, max_resolution=patches),
            (num_samples,))
  return (dict(type='spectrogram', input_key='spectrogram',
               patch_shape=(1, 1), num_freq_bands=32,
               max_resolution=mel_shape), mel_shape)


def _video(num_frames: int, size: int) -> tuple[dict, tuple[int, ...]]:
  return (dict(type='video', input_key='video', patch_shape=(2, 8, 8),
               num_freq_bands=16),
          (num_frames, size, size, 3))


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  options = common.parse_arg(arg, modality='audio_video', audio='raw',
                             p2=False, debug=False, seed=0)
  if options.modality not in ('audio', 'video', 'audio_video'):
    raise ValueError("modality must be 'audio', 'video' or 'audio_video', "
                     f'got {options.modality!r}.')
  if options.audio not in ('raw', 'mel'):
    raise ValueError(f"audio must be 'raw' or 'mel', got {options.audio!r}.")
  if options.p2:
    options.modality, options.audio = 'audio_video', 'raw'

  num_samples, mel_shape, num_frames, size = (
      61_440, (MEL_FRAMES, MEL_BINS), 32, 224)
  num_latents = latent_dim = 512
  batch_size, training_steps = 512, 100 * NUM_TRAIN // 512
  if options.debug:
    num_samples, mel_shape, num_frames, size = 4_096, (16, 8), 4, 16
    num_latents, latent_dim = 8, 16
    batch_size, training_steps = 8, 4

  audio, audio_shape = _audio(options.audio, num_samples, mel_shape)
  video, video_shape = _video(num_frames, size)
  audio_key = audio['input_key']
  if options.modality == 'audio':
    preprocessor, input_shape = audio, {audio_key: audio_shape}
  elif options.modality == 'video':
    preprocessor, input_shape = video, {'video': video_shape}
  else:
    preprocessor = dict(
        type='multimodal', min_padding_size=4,
        modality_dropout={'video': 0.3},
        modalities={audio_key: audio, 'video': video})
    input_shape = {audio_key: audio_shape, 'video': video_shape}

  encoder = dict(
      num_latents=num_latents, latent_dim=latent_dim, num_cross_attends=2,
      num_self_attends_per_block=8, num_cross_heads=1,
      num_self_heads=2 if options.debug else 8,
      cross_widening_factor=1, self_widening_factor=1,
      share_cross_attends=False, share_latent_transformer=False,
      dropout_prob=0.0)
  if options.p2:
    encoder.update(num_cross_attends=1, num_blocks=1,
                   num_self_attends_per_block=12)
  if options.debug:
    encoder.update(num_self_attends_per_block=1)

  data = dict(
      name='audioset', train_split='unbalanced_train', eval_split='eval',
      num_train_examples=NUM_TRAIN, num_classes=NUM_CLASSES,
      input_shape=input_shape,
      data_dir=ml_collections.FieldReference(None, field_type=str),
      modality=options.modality, audio_representation=options.audio,
      num_samples=num_samples, mel_shape=mel_shape, num_frames=num_frames,
      video_size=size, num_eval_windows=16)
  if options.debug:
    data.update(data_dir=os.path.join(_FIXTURE, 'tfrecords'),
                train_split='balanced_train', num_train_examples=8)

  experiment = ml_collections.ConfigDict(dict(
      experiment='multilabel', data=data,
      model=dict(preprocessor=preprocessor, encoder=encoder,
                 decoder=dict(type='average', num_classes=NUM_CLASSES)),
      optimizer=common.optimizer(
          name='lamb', base_lr=4e-3, weight_decay=0.1, clip_grad_norm=10.0,
          schedule='constant_cosine', constant_fraction=0.5),
      training=dict(batch_size=batch_size, label_smoothing=0.0,
                    precision='float32', data_seed=options.seed,
                    log_every_steps=100, total_steps=training_steps),
      evaluation=dict(batch_size=batch_size, per_class_metrics=False),
  ))
  name = f'audioset_{options.modality}_{options.audio}'
  config = common.jaxline_config(
      experiment=experiment, training_steps=training_steps,
      checkpoint_dir=f'/tmp/perceiver_jax/{name}', best_metric='mAP',
      save_checkpoint_interval=2000, log_interval=100)
  config.random_seed = options.seed
  exp = config.experiment_kwargs.config
  exp.training.total_steps = config.get_ref('training_steps')
  config.lock()
  return config
