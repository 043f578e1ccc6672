"""HuggingFace's PyTorch Perceiver at an image config's sizes, for timing.

Used by `scripts/benchmark.py --compare=hf` only; needs the optional extra
`pip install -e '.[compare]'` (torch, transformers). Nothing here runs at
import.

`build_model` makes `transformers.PerceiverForImageClassificationFourier` and
then overrides what that class fixes: its input preprocessor (64 bands,
224-pixel max resolution) is rebuilt with the config's bands and resolution,
and its cross-attention with the config's key/value width (P1: the input's
channel count; HF's default would be the latent width). What stays HF's own:
the decoder (a cross-attend block of one learned query over the latents,
where ours averages them: a small extra cost, on HF's side) and the
LayerNorm epsilon (1e-12); its attention dropout is set to 0, as ours. The
training step uses torch's AdamW: torch has no LAMB, whose extra
per-parameter passes count against ours. torch's OpenMP threads are made to
sleep, not spin, between steps (OMP_WAIT_POLICY=PASSIVE, unless set).
"""

import os
from typing import Any, Callable

import ml_collections


def _require_torch():
  # torch's OpenMP threads otherwise spin-wait after each of its steps and
  # take the cores from the next step of ours (measured: our bench_a train
  # step 30% slower when taking turns). Only read before torch is loaded.
  os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        '--compare=hf needs torch and transformers: '
        "pip install -e '.[compare]' (torch's CPU wheel: pip install torch "
        '--index-url https://download.pytorch.org/whl/cpu).') from e
  return torch, transformers


def _image_sizes(experiment_config: ml_collections.ConfigDict
                 ) -> dict[str, Any]:
  """The sizes HF's model needs, checked for what it can express."""
  model = experiment_config.model
  pre, enc = model.preprocessor, model.encoder
  problems = []
  if pre.get('type') != 'image' or pre.get('prep_type') != 'pixels':
    problems.append('an image preprocessor on raw pixels')
  if pre.get('position_encoding_type') != 'fourier':
    problems.append('Fourier position features')
  if pre.get('permutation_seed') is not None:
    problems.append('unpermuted pixels')
  if enc.num_cross_attends != 1:
    problems.append(f'1 cross-attend (got {enc.num_cross_attends})')
  if model.decoder.type != 'average':
    problems.append('a classification decoder')
  if problems:
    raise ValueError('HF\'s PerceiverForImageClassificationFourier can only '
                     'stand in for a config with ' + ', '.join(problems) +
                     '.')
  height, width, channels = experiment_config.data.input_shape
  num_bands = pre.num_freq_bands
  # [pixels, (x, y), sin and cos of each band per axis].
  input_channels = channels + 2 * (1 + 2 * num_bands)
  return dict(
      image_shape=(height, width, channels), input_channels=input_channels,
      num_freq_bands=num_bands, max_resolution=tuple(pre.max_resolution),
      num_latents=enc.num_latents, latent_dim=enc.latent_dim,
      num_blocks=enc.num_blocks,
      num_self_attends_per_block=enc.num_self_attends_per_block,
      num_self_heads=enc.num_self_heads, num_cross_heads=enc.num_cross_heads,
      cross_qk_channels=enc.get('cross_qk_channels') or input_channels,
      cross_v_channels=enc.get('cross_v_channels'),
      self_qk_channels=enc.get('self_qk_channels'),
      cross_widening_factor=enc.cross_widening_factor,
      self_widening_factor=enc.self_widening_factor,
      num_classes=model.decoder.num_classes)


def build_model(experiment_config: ml_collections.ConfigDict):
  """HF's Perceiver (a torch.nn.Module) at the config's sizes."""
  torch, transformers = _require_torch()
  del torch
  from transformers.models.perceiver import modeling_perceiver as hf  # pylint: disable=g-import-not-at-top
  s = _image_sizes(experiment_config)
  config = transformers.PerceiverConfig(
      num_latents=s['num_latents'], d_latents=s['latent_dim'],
      d_model=s['input_channels'], num_blocks=s['num_blocks'],
      num_self_attends_per_block=s['num_self_attends_per_block'],
      num_self_attention_heads=s['num_self_heads'],
      num_cross_attention_heads=s['num_cross_heads'],
      qk_channels=s['self_qk_channels'],
      self_attention_widening_factor=s['self_widening_factor'],
      cross_attention_widening_factor=s['cross_widening_factor'],
      attention_probs_dropout_prob=0.0, image_size=s['image_shape'][0],
      num_labels=s['num_classes'])
  model = transformers.PerceiverForImageClassificationFourier(config)
  perceiver = model.perceiver
  perceiver.input_preprocessor = hf.PerceiverImagePreprocessor(
      config, prep_type='pixels', spatial_downsample=1,
      in_channels=s['image_shape'][-1],
      fourier_position_encoding_kwargs=dict(
          concat_pos=True, max_resolution=s['max_resolution'],
          num_bands=s['num_freq_bands'], sine_only=False))
  if perceiver.input_preprocessor.num_channels != s['input_channels']:
    raise ValueError(
        f'HF\'s preprocessor gives {perceiver.input_preprocessor.num_channels}'
        f' channels, ours {s["input_channels"]}.')
  perceiver.encoder.cross_attention = hf.PerceiverLayer(
      config, is_cross_attention=True, qk_channels=s['cross_qk_channels'],
      v_channels=s['cross_v_channels'], num_heads=s['num_cross_heads'],
      q_dim=s['latent_dim'], kv_dim=s['input_channels'],
      widening_factor=s['cross_widening_factor'], use_query_residual=True)
  return model


def make_step(experiment_config: ml_collections.ConfigDict, mode: str,
              batch_size: int, seed: int = 0) -> Callable[[], Any]:
  """One forward (no grad) or training step of HF's model on random data.

  Images are [B, C, H, W] in [0, 1), as HF's image processor hands them out.
  """
  torch, _ = _require_torch()
  if mode not in ('train', 'forward'):
    raise ValueError(f"mode must be 'train' or 'forward', got {mode!r}.")
  torch.manual_seed(seed)
  model = build_model(experiment_config)
  height, width, channels = experiment_config.data.input_shape
  images = torch.rand(batch_size, channels, height, width)
  labels = torch.randint(0, experiment_config.data.num_classes, (batch_size,))
  if mode == 'forward':
    model.eval()

    def forward():
      with torch.inference_mode():
        return model(inputs=images).logits
    return forward

  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
  smoothing = experiment_config.training.get('label_smoothing', 0.0)

  def train_step():
    logits = model(inputs=images).logits
    loss = torch.nn.functional.cross_entropy(logits, labels,
                                             label_smoothing=smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()
  return train_step


def num_threads() -> int:
  torch, _ = _require_torch()
  return torch.get_num_threads()
