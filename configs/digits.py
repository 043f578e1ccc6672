r"""Default experiment: a small Perceiver (FF) on scikit-learn's digits.

The README's main job. 8x8 grayscale handwritten digits, bundled with
scikit-learn (no download): 1,497 training / 300 held-out test images.
A miniature of P1's ImageNet model: pixels + 2D Fourier features
(num_freq_bands=4, max_resolution=8: 1 + 2*(2*4+1) = 19 channels, M = 64),
32 x 64 latents, 2 cross-attends interleaved with a 2-block latent
Transformer, P1 weight sharing, average-then-project decoder, LAMB.

  python scripts/train.py --config=configs/digits.py
  python scripts/evaluate.py --config=configs/digits.py \
      --checkpoint=/tmp/perceiver_jax/digits

Presets (`--config=configs/digits.py:permuted,seed=1`):
  permuted   one fixed pixel permutation applied after the position features
             are attached (P1's permuted ImageNet, Tab. 2, in miniature); a
             Perceiver with Fourier features is invariant to it.
  pos=learned
             P1 Tab. 2 "Perceiver (learned pos.)" in miniature: a learned
             64 x 18 position encoding (truncated normal, init scale 1.0, as
             configs/imagenet_permuted.py:pos=learned; 18 = the Fourier
             channels it replaces) concatenated to the pixel, and ONE
             cross-attend. Invariant to the permutation as well.
  baseline=resnet|resnet_ff|vit|vit_ff|transformer_ff
             P1's baselines (Tab. 1, 2) scaled to 8x8, through the same
             experiment, data, preprocessing and permutation (the
             permutation comes after the Fourier features; the ResNet and
             ViT reshape the permuted [64, C] array back to the 8x8 grid):
               resnet       a small hk.nets.ResNet (our choice: 4 groups of
                            1 basic block, 16/32/32/64 channels; stem conv
                            3x3 stride 1 to 16 channels, BatchNorm, max-pool
                            3x3/2; group strides 1, 2, 2, 1), pixels only
                            (1 channel). ImageNet analogue: ResNet-50, 77.6.
                            Deviation from hk.nets.ResNet: the logits layer
                            is initialised as the project's other Linears
                            (variance scaling), not to zero
                            (zero_init_logits=False). Under LAMB a
                            zero-initialised weight hardly grows (the trust
                            ratio scales each update to lr x its norm): the
                            head stayed near zero and some seeds ended
                            300 steps far behind the others, their
                            training loss still high.
               resnet_ff    the same on pixels + Fourier features (19
                            channels). ResNet-50 (FF): 73.5 -> 39.4 permuted.
               vit_ff       a ViT on 2x2 patches (16 patches + class token),
                            width 64, 2 layers, 4 heads, MLP widening 2.
                            ViT-B-16 (FF): 76.7 -> 61.7 permuted.
               vit          the same on pixels only (4 values per patch;
                            its learned position embeddings place them).
                            ImageNet analogue: ViT-B-16, 77.9.
               transformer_ff  a Transformer over the 64 pixels (+ Fourier
                            features) as a set: width 32, 2 layers, 4 heads,
                            widening 2, mean-pooled. Transformer 64x64 (FF):
                            57.0 -> 57.0 permuted.
             Trained with the Perceiver's recipe below (LAMB, same schedule,
             batch and seed handling) for BASELINE_STEPS = 300 steps instead
             of 1,000 (so Table 2's runs fit on 2 CPU cores), so that only
             the architecture and the length differ. Combines with permuted, seed=N and debug, e.g.
             `configs/digits.py:baseline=vit_ff,permuted,seed=2`.
  debug      a few steps of a tinier model (for tests and smoke runs).
  seed=N     initialisation / data-order seed.

Expected: >= 95% test top-1 for both presets (measured numbers in
docs/performance.md). Deviations from P1: tiny model; AdamW-free LAMB with warmup-free
constant-then-cosine schedule over 1,000 steps.

Precision: training.precision='auto', bfloat16 compute with float32
parameters, softmax and LayerNorm statistics on GPU and TPU, float32 on
CPU ('float32' or 'bfloat16' force one).
"""

from typing import Optional

from configs import common
import ml_collections

NUM_CLASSES = 10
PERMUTATION_SEED = 1234
BASELINES = ('resnet', 'resnet_ff', 'vit', 'vit_ff', 'transformer_ff')
BASELINE_STEPS = 300


def baseline_model(baseline: str, *, num_classes: int,
                   permutation_seed: Optional[int],
                   debug: bool = False) -> ml_collections.ConfigDict:
  """The model section of a digits baseline (BASELINES; models.py).

  The preprocessor is the Perceiver's: pixels, with the Perceiver's Fourier
  features for the _ff rows, then the permutation; the ResNet and ViT
  reshape the [64, C] array back to the 8x8 grid.
  """
  if baseline not in BASELINES:
    raise ValueError(f'Unknown baseline {baseline!r}; expected one of '
                     f'{BASELINES}.')
  kind, _, features = baseline.partition('_')
  preprocessor = dict(
      type='image', prep_type='pixels',
      position_encoding_type='fourier' if features == 'ff' else 'none',
      num_freq_bands=4, max_resolution=(8, 8),
      permutation_seed=permutation_seed)
  width, layers, heads = (16, 1, 2) if debug else (64, 2, 4)
  if kind == 'resnet':
    channels = (4, 4, 8, 8) if debug else (16, 32, 32, 64)
    # 8x8 -> stem conv 8x8 -> max-pool 4x4 -> groups 4x4, 2x2, 1x1, 1x1.
    network = dict(blocks_per_group=(1, 1, 1, 1),
                   channels_per_group=channels, bottleneck=False,
                   initial_conv_channels=channels[0],
                   initial_conv_kernel_shape=3, initial_conv_stride=1,
                   strides=(1, 2, 2, 1), zero_init_logits=False)
  elif kind == 'vit':
    network = dict(patch_size=2, hidden_size=width, num_layers=layers,
                   num_heads=heads, widening_factor=2)
  else:
    # Narrower than the ViT: it attends over 64 tokens, the ViT over 17.
    network = dict(hidden_size=16 if debug else 32,
                   num_layers=layers, num_heads=heads, widening_factor=2)
  return ml_collections.ConfigDict(dict(
      type=kind, preprocessor=preprocessor,
      network=dict(num_classes=num_classes, **network), backend='auto'))


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  options = common.parse_arg(arg, permuted=False, pos='fourier', baseline='',
                             debug=False, seed=0)
  if options.pos not in ('fourier', 'learned'):
    raise ValueError(
        f"pos must be 'fourier' or 'learned', got {options.pos!r}.")
  if options.baseline and options.baseline not in BASELINES:
    raise ValueError(f'Unknown baseline {options.baseline!r}; expected one '
                     f'of {BASELINES}.')
  if options.baseline and options.pos != 'fourier':
    raise ValueError('pos= selects the Perceiver\'s position encoding; the '
                     f'baselines set their own (got {arg!r}).')
  permutation_seed = PERMUTATION_SEED if options.permuted else None
  # The baselines learn digits in fewer steps (measured: see BASELINES).
  training_steps = 20 if options.debug else (
      BASELINE_STEPS if options.baseline else 1000)

  experiment = ml_collections.ConfigDict(dict(
      experiment='classification',
      data=dict(name='digits', train_split='train', eval_split='test',
                num_train_examples=1497, num_classes=10,
                input_shape=(8, 8, 1)),
      model=dict(
          preprocessor=dict(
              type='image', prep_type='pixels',
              position_encoding_type='fourier', num_freq_bands=4,
              max_resolution=(8, 8),
              permutation_seed=permutation_seed),
          encoder=dict(
              num_latents=32, latent_dim=64, num_cross_attends=2,
              num_blocks=2, num_self_attends_per_block=2, num_cross_heads=1,
              num_self_heads=4, cross_widening_factor=2,
              self_widening_factor=2, share_cross_attends=True,
              share_latent_transformer=True, dropout_prob=0.0,
              **common.efficiency_options()),
          decoder=dict(type='average', num_classes=10),
          backend='auto',
      ),
      optimizer=common.optimizer(
          name='lamb', base_lr=4e-3, weight_decay=1e-2, clip_grad_norm=10.0,
          schedule='constant_cosine', constant_fraction=0.5),
      training=dict(batch_size=64, label_smoothing=0.0,
                    precision='auto', data_seed=options.seed,
                    log_every_steps=100, total_steps=training_steps),
      evaluation=dict(batch_size=64, per_class_metrics=False),
  ))
  model = experiment.model
  if options.pos == 'learned':
    model.preprocessor.update(position_encoding_type='learned',
                              learned_pos_channels=18,
                              learned_pos_init_scale=1.0)
    model.encoder.num_cross_attends = 1
  if options.baseline:
    experiment.model = baseline_model(
        options.baseline, num_classes=NUM_CLASSES,
        permutation_seed=permutation_seed, debug=options.debug)
  name = '_'.join(['digits'] + [options.baseline] * bool(options.baseline) +
                  ['learned'] * (options.pos == 'learned') +
                  ['permuted'] * options.permuted)
  config = common.jaxline_config(
      experiment=experiment, training_steps=training_steps,
      checkpoint_dir=f'/tmp/perceiver_jax/{name}',
      save_checkpoint_interval=500, log_interval=100)
  config.random_seed = options.seed
  exp = config.experiment_kwargs.config
  # One value, one place: the schedule length follows training_steps.
  exp.training.total_steps = config.get_ref('training_steps')
  if options.debug and not options.baseline:
    exp.model.encoder.num_latents = 8
    exp.model.encoder.latent_dim = 16
    exp.model.encoder.num_self_heads = 2
  if options.debug:
    exp.training.batch_size = 16
    exp.evaluation.batch_size = 16

  config.lock()
  return config
