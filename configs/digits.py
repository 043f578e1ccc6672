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


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  options = common.parse_arg(arg, permuted=False, debug=False, seed=0)
  training_steps = 20 if options.debug else 1000

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
              permutation_seed=1234 if options.permuted else None),
          encoder=dict(
              num_latents=32, latent_dim=64, num_cross_attends=2,
              num_self_attends_per_block=2, num_cross_heads=1,
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
  name = 'digits_permuted' if options.permuted else 'digits'
  config = common.jaxline_config(
      experiment=experiment, training_steps=training_steps,
      checkpoint_dir=f'/tmp/perceiver_jax/{name}',
      save_checkpoint_interval=500, log_interval=100)
  config.random_seed = options.seed
  exp = config.experiment_kwargs.config
  # One value, one place: the schedule length follows training_steps.
  exp.training.total_steps = config.get_ref('training_steps')
  if options.debug:
    exp.model.encoder.num_latents = 8
    exp.model.encoder.latent_dim = 16
    exp.model.encoder.num_self_heads = 2
    exp.training.batch_size = 16
    exp.evaluation.batch_size = 16

  config.lock()
  return config
