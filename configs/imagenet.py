r"""ImageNet (ILSVRC-2012) with the Perceiver: P1 Tab. 1 and its ablations.

Default: P1 Tab. 1 "Perceiver (FF)", 78.0% top-1 (paper).
  224x224 crops as M = 50,176 pixels x 261 channels (RGB + 2D Fourier
  features, 64 bands, max resolution 224); 512 x 1024 latents; 8 cross-attends
  (1 head) interleaved with a 6-block latent Transformer (8 heads), widening 1;
  cross-attend 1 unshared, 2..8 shared, latent Transformer shared: 44.9M
  params, 707.2B FLOPs. LAMB 4e-3, /10 at epochs 84, 102, 114 of 120, batch
  1024, weight decay 0.1, clip 10, label smoothing 0.1, RandAugment 4/5.

  python scripts/train.py --config=configs/imagenet.py \
      --config.experiment_kwargs.config.data.data_dir=/path/to/tfds \
      --config.checkpoint_dir=gs://bucket/perceiver_imagenet

Presets (comma-separated after ':'):
  one_cross   P1 Tab. 6 "1 cross-attend at start": 42.1M params, 404.3B
              FLOPs, 76.7% expected.
  unshared    P1 Tab. 7, no weight sharing: 326.2M params, 72.9% expected.
  p2          P2 Tab. 5 config A: 1 cross-attend, 8 x 6 shared blocks, one
              1024-wide learned query decoder (48.4M params, 79.0%); LAMB 2e-3
              constant 55 epochs then cosine over 55; MixUp 0.2 + CutMix.
  p2,prep=conv
              P2 Tab. 5 / the released conv-preprocessing model: Conv 7x7
              stride 2 without bias, BatchNorm (decay 0.9, eps 1e-5), ReLU,
              max-pool 3x3 stride 2 -> 56 x 56 x 64, + Fourier features
              (64 bands, max resolution 56): 322 channels; decoder query
              residual on. 48,646,522 params (as released), 82.1% expected.
              BatchNorm keeps moving averages as model state.
  p2,pos=learned
              P2 Tab. 5 / the released learned-position model: 1x1 conv to
              256 channels per pixel, + a learned 50,176 x 256 position
              encoding (truncated normal, init scale 0.02) projected by a
              256 -> 256 linear map: 512 channels; decoder query residual
              off. 62,255,848 params (as released), 72.7% expected; fixed to
              224 x 224 inputs.
  bench_a     benchmark: 64x64 images (M = 4,096, 133 channels: 32 bands,
              max resolution 64), 1 cross-attend, 128 x 256 latents, 6 blocks,
              widening 4, batch 16.
  bench_b     benchmark: 128x128 images (M = 16,384), 256 x 512 latents,
              otherwise bench_a, batch 8; cross-attention in chunks of 4,096
              inputs (same results; bounds the reference ops' memory).
  baseline=resnet50|resnet50_ff|vit_b16|vit_b16_ff|transformer_64_ff
              P1 Tab. 1's baselines, through the same experiment, data
              pipeline and preprocessor as the Perceiver (models.py,
              model.type); the _ff rows concatenate the Perceiver's Fourier
              features (64 bands, max resolution 224) to RGB: 261 channels.
                resnet50           hk.nets.ResNet ResNet-50 (BatchNorm state),
                                   RGB: 25,557,032 params; 77.6% (P1, cited).
                resnet50_ff        the 261-channel input feeds the stem:
                                   25.6M params; 73.5%.
                vit_b16            ViT-B/16 (class token, learned position
                                   embeddings, 12 x 768, 12 heads, MLP 3072):
                                   86,567,656 params; 77.9% (P1, cited).
                vit_b16_ff         Fourier features concatenated before
                                   patching (16 x 16 x 261 per patch): 76.7%.
                transformer_64_ff  a Transformer over the 4,096 pixels of the
                                   image downsampled to 64x64 (in the data
                                   pipeline: data.image_size=64, the crop
                                   resized bicubically), + Fourier features
                                   (32 bands, max resolution 64: 133
                                   channels); 57.0%.
              Choices P1 leaves open (ours): the Transformer is 6 pre-LN
              layers of width 512, 8 heads, MLP widening 1, mean-pooled then
              a linear head; all baselines train with THIS file's Perceiver
              recipe (LAMB 4e-3 with the epoch-84/102/114 step decay over 120
              epochs, batch 1024, weight decay 0.1, clip 10, label smoothing
              0.1, RandAugment 4/5), so that only the architecture differs
              from the Perceiver row. LAMB trains ResNet-50 at large batch
              (You et al. 2020); the cited 77.6 / 77.9 rows came from their
              own papers' recipes (SGD / Adam), which this does not copy.
              ResNet-50's logits layer starts as the other Linears
              (zero_init_logits=False), not at hk.nets' zero: under LAMB a
              zero weight hardly grows (configs/digits.py measured it).
              With debug: 16x16 images and tiny networks of the same kind.
  debug       16x16 images, a tiny model and a few steps (tests).
  seed=N      initialisation / data-order seed.

Fine-tuning: training.init_checkpoint=DIR starts training from the params
(and model state) of a project checkpoint, e.g. one scripts/import_checkpoint.py
wrote from a released file, with a fresh optimizer at step 0:

  python scripts/train.py --config=configs/imagenet.py:p2,prep=conv \
      --config.experiment_kwargs.config.training.init_checkpoint=DIR ...

Fourier-feature models take any resolution (data.image_size, input_shape);
the learned-position model only 224 x 224.

Deviations: weight decay, clipping and label smoothing are not stated in P1;
the values above are those of the released Perceiver IO code (P2). P1's
batch size is inferred (1024 on 64 TPUv3).

Precision: training.precision='auto', bfloat16 compute with float32
parameters, softmax and LayerNorm statistics on GPU and TPU, float32 on
CPU ('float32' or 'bfloat16' force one).
"""

from typing import Optional

from configs import common
import ml_collections

NUM_TRAIN = 1_281_167
NUM_CLASSES = 1000
# Eval centre crop, as a fraction of the short side (P2 App. A.1).
EVAL_CROP_FRACTION = 224 / 256


def image_model(*, image_size: int, num_freq_bands: int = 64,
                num_latents: int = 512, latent_dim: int = 1024,
                num_cross_attends: int = 8, num_blocks: int = 8,
                num_self_attends_per_block: int = 6,
                widening_factor: int = 1, decoder: str = 'average',
                position_encoding_type: str = 'fourier',
                permutation_seed: Optional[int] = None
                ) -> ml_collections.ConfigDict:
  """The model section of an image classification Perceiver."""
  preprocessor = dict(type='image', prep_type='pixels',
                      position_encoding_type=position_encoding_type,
                      num_freq_bands=num_freq_bands,
                      max_resolution=(image_size, image_size),
                      permutation_seed=permutation_seed)
  if position_encoding_type == 'learned':
    preprocessor.update(learned_pos_channels=128, learned_pos_init_scale=1.0)
  decoders = {
      'average': dict(type='average', num_classes=NUM_CLASSES),
      'query': dict(type='query', num_classes=NUM_CLASSES,
                    query_channels=1024, use_query_residual=True),
  }
  return ml_collections.ConfigDict(dict(
      preprocessor=preprocessor,
      encoder=dict(
          num_latents=num_latents, latent_dim=latent_dim,
          num_cross_attends=num_cross_attends, num_blocks=num_blocks,
          num_self_attends_per_block=num_self_attends_per_block,
          num_cross_heads=1, num_self_heads=8,
          cross_widening_factor=widening_factor,
          self_widening_factor=widening_factor, share_cross_attends=True,
          share_latent_transformer=True, dropout_prob=0.0,
          **common.efficiency_options()),
      decoder=decoders[decoder],
      backend='auto',
  ))


BASELINES = ('resnet50', 'resnet50_ff', 'vit_b16', 'vit_b16_ff',
             'transformer_64_ff')


def baseline_model(baseline: str, *, image_size: int,
                   permutation_seed: Optional[int] = None,
                   debug: bool = False) -> ml_collections.ConfigDict:
  """The model section of a P1 baseline (models.py, modules/baselines.py).

  The preprocessor is the Perceiver's pixels preprocessor: for the _ff rows
  the 2D Fourier features of configs/imagenet.py (64 bands, max resolution
  = the image size; 32 bands for the 64x64 Transformer, as bench_a),
  concatenated, then the permutation if any; the ResNet and the ViT reshape
  the [M, C] array back to the [H, W, C] grid.

  Args:
    baseline: one of BASELINES.
    image_size: side of the square images fed (224; 64 for the Transformer;
      16 with debug).
    permutation_seed: see perceiver_jax/models.py.
    debug: tiny sizes of the same structure.
  """
  if baseline not in BASELINES:
    raise ValueError(f'Unknown baseline {baseline!r}; expected one of '
                     f'{BASELINES}.')
  kind = baseline.split('_')[0]
  fourier = baseline.endswith('_ff')
  bands = 32 if kind == 'transformer' else 64
  preprocessor = dict(
      type='image', prep_type='pixels',
      position_encoding_type='fourier' if fourier else 'none',
      num_freq_bands=4 if debug else bands,
      max_resolution=(image_size, image_size),
      permutation_seed=permutation_seed)
  patch_size = 4 if debug else 16
  return ml_collections.ConfigDict(dict(
      type='resnet' if kind == 'resnet50' else kind,
      preprocessor=preprocessor,
      network=baseline_network(kind, num_classes=NUM_CLASSES,
                               patch_size=patch_size, debug=debug),
      backend='auto'))


def baseline_network(kind: str, *, num_classes: int, patch_size: int = 16,
                     debug: bool = False) -> dict[str, object]:
  """The `network` section of a P1 baseline (modules/baselines.py).

  Args:
    kind: 'resnet50' (ResNet-50), 'vit' (ViT-B/`patch_size`) or
      'transformer' (6 layers of width 512, 8 heads, MLP ratio 1: our
      choice, P1 gives no size).
    num_classes: the head's classes.
    patch_size: the ViT's patch side (16 on ImageNet, 2 on ModelNet40).
    debug: tiny sizes of the same structure.
  """
  if kind == 'resnet50':
    network = dict(blocks_per_group=(3, 4, 6, 3),
                   channels_per_group=(256, 512, 1024, 2048),
                   bottleneck=True, initial_conv_channels=64,
                   initial_conv_kernel_shape=7, initial_conv_stride=2,
                   strides=(1, 2, 2, 2), zero_init_logits=False)
    if debug:
      network.update(blocks_per_group=(1, 1, 1, 1),
                     channels_per_group=(8, 8, 16, 16), bottleneck=False,
                     initial_conv_channels=8)
  elif kind == 'vit':
    network = dict(patch_size=patch_size, hidden_size=768, num_layers=12,
                   num_heads=12, widening_factor=4, dropout_prob=0.0)
    if debug:
      network.update(hidden_size=16, num_layers=1, num_heads=2)
  elif kind == 'transformer':
    network = dict(hidden_size=512, num_layers=6, num_heads=8,
                   widening_factor=1, dropout_prob=0.0)
    if debug:
      network.update(hidden_size=16, num_layers=1, num_heads=2)
  else:
    raise ValueError(f'Unknown baseline network {kind!r}; expected '
                     "'resnet50', 'vit' or 'transformer'.")
  return dict(num_classes=num_classes, **network)


def released_preprocessor(prep: str, pos: str,
                          permutation_seed: Optional[int] = None
                          ) -> ml_collections.ConfigDict:
  """The preprocessor of a released Perceiver IO ImageNet model (p2 presets).

  Sizes from deepmind-research perceiver/colabs/imagenet_classification.ipynb
  (conv_maxpool_configs, learned_pos_configs).

  Args:
    prep: 'pixels' or 'conv'.
    pos: 'fourier' or 'learned' (with prep='pixels' only).
    permutation_seed: see perceiver_jax/models.py.
  """
  if prep == 'conv':
    section = dict(prep_type='conv', conv_channels=64, conv_norm='batch_norm',
                   position_encoding_type='fourier', num_freq_bands=64,
                   max_resolution=(56, 56))
  elif pos == 'learned':
    section = dict(prep_type='conv1x1', conv_channels=256,
                   position_encoding_type='learned', learned_pos_channels=256,
                   learned_pos_init_scale=0.02, project_pos_dim=256)
  else:
    section = dict(prep_type='pixels', position_encoding_type='fourier',
                   num_freq_bands=64, max_resolution=(224, 224))
  return ml_collections.ConfigDict(dict(
      type='image', permutation_seed=permutation_seed, **section))


def imagenet_data(image_size: int = 224) -> ml_collections.ConfigDict:
  """The data section (fields documented in perceiver_jax/data/imagenet.py).

  Its defaults equal that module's `default_config()` (kept as literals so
  that loading a config does not import TensorFlow): data_dir None (tfds'
  default), manual_dir None (never build), tfds_version None (the newest
  prepared version tfds can read), eval_crop_fraction 224/256,
  threadpool_size 48.
  """
  return ml_collections.ConfigDict(dict(
      name='imagenet', train_split='train', eval_split='validation',
      num_train_examples=NUM_TRAIN, num_classes=NUM_CLASSES,
      input_shape=(image_size, image_size, 3), image_size=image_size,
      data_dir=ml_collections.FieldReference(None, field_type=str),
      manual_dir=ml_collections.FieldReference(None, field_type=str),
      tfds_version=ml_collections.FieldReference(None, field_type=str),
      randaugment_layers=4, randaugment_magnitude=5.0,
      mixup_alpha=0.0, cutmix_alpha=0.0,
      eval_crop_fraction=EVAL_CROP_FRACTION, shuffle_buffer=10_000,
      deterministic=False, threadpool_size=48))


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  options = common.parse_arg(arg, one_cross=False, unshared=False, p2=False,
                             prep='pixels', pos='fourier', bench_a=False,
                             bench_b=False, baseline='', debug=False, seed=0)
  check_baseline(options, arg, others=('one_cross', 'unshared', 'p2',
                                       'bench_a', 'bench_b'))
  if options.prep not in ('pixels', 'conv'):
    raise ValueError(f"prep must be 'pixels' or 'conv', got {options.prep!r}.")
  if options.pos not in ('fourier', 'learned'):
    raise ValueError(
        f"pos must be 'fourier' or 'learned', got {options.pos!r}.")
  released = (options.prep, options.pos)
  if released != ('pixels', 'fourier') and not options.p2:
    raise ValueError('prep=/pos= select the released Perceiver IO models: '
                     f'use them with p2 (got {arg!r}).')
  if released == ('conv', 'learned'):
    raise ValueError('No released model has prep=conv with pos=learned.')
  name = f'imagenet_{options.baseline}' if options.baseline else 'imagenet'
  return build_config(options, name=name)


def check_baseline(options: ml_collections.ConfigDict, arg: Optional[str],
                   others: tuple[str, ...]) -> None:
  """Raises ValueError for an unknown baseline or one with Perceiver presets.
  """
  if not options.baseline:
    return
  if options.baseline not in BASELINES:
    raise ValueError(f'Unknown baseline {options.baseline!r}; expected one '
                     f'of {BASELINES}.')
  clash = [name for name in others if options.get(name)]
  if options.get('pos', 'fourier') != 'fourier':
    clash.append('pos')
  if options.get('prep', 'pixels') != 'pixels':
    clash.append('prep')
  if clash:
    raise ValueError(f'baseline= excludes the Perceiver presets {clash} '
                     f'(got {arg!r}).')


def build_config(options: ml_collections.ConfigDict, *, name: str,
                 permutation_seed: Optional[int] = None,
                 position_encoding_type: str = 'fourier'
                 ) -> ml_collections.ConfigDict:
  """The ImageNet config for parsed options (shared with the permuted file)."""
  num_epochs = 120
  model = image_model(image_size=224, permutation_seed=permutation_seed,
                      position_encoding_type=position_encoding_type)
  optimizer = common.optimizer(
      name='lamb', base_lr=4e-3, weight_decay=0.1, clip_grad_norm=10.0,
      schedule='step_decay', decay_epochs=(84, 102, 114), decay_factor=10.0)
  data = imagenet_data(224)

  if options.get('one_cross') or position_encoding_type == 'learned':
    model.encoder.num_cross_attends = 1
  if options.get('unshared'):
    model.encoder.share_cross_attends = False
    model.encoder.share_latent_transformer = False
  if options.get('p2'):
    num_epochs = 110
    model = image_model(image_size=224, num_cross_attends=1,
                        decoder='query', permutation_seed=permutation_seed)
    prep, pos = options.get('prep', 'pixels'), options.get('pos', 'fourier')
    model.preprocessor = released_preprocessor(prep, pos, permutation_seed)
    # The released learned-position model has no decoder query residual.
    model.decoder.use_query_residual = pos != 'learned'
    optimizer = common.optimizer(
        name='lamb', base_lr=2e-3, weight_decay=0.1, clip_grad_norm=10.0,
        schedule='constant_cosine', constant_fraction=0.5)
    data.mixup_alpha, data.cutmix_alpha = 0.2, 1.0

  batch_size = 1024
  # bench_b chunks its 16,384 inputs, which bounds the attention's memory
  # on the reference ops (GPU, TPU, model.backend='reference'); the CPU
  # backend's fused attention works in tiles of its own and ignores it.
  for bench, size, latents, batch, chunk in (
      ('bench_a', 64, (128, 256), 16, None),
      ('bench_b', 128, (256, 512), 8, 4096)):
    if options.get(bench):
      model = image_model(
          image_size=size, num_freq_bands=32, num_latents=latents[0],
          latent_dim=latents[1], num_cross_attends=1, num_blocks=1,
          widening_factor=4)
      model.encoder.cross_attention_chunk_size = chunk
      data = imagenet_data(size)
      batch_size = batch

  baseline = options.get('baseline')
  if baseline:
    # The Transformer's 64x64 images come from the data pipeline: its crop
    # is resized to data.image_size (bicubic), in training and evaluation.
    size = 64 if baseline.startswith('transformer') else 224
    size = 16 if options.debug else size
    model = baseline_model(baseline, image_size=size,
                           permutation_seed=permutation_seed,
                           debug=options.debug)
    data = imagenet_data(size)

  training_steps = num_epochs * NUM_TRAIN // batch_size
  eval_batch_size = 1000
  if options.debug and baseline:
    data.update(randaugment_layers=1)
    batch_size, eval_batch_size, training_steps = 16, 16, 4
  elif options.debug:
    # Shrink every size but keep the presets' structure (cross-attend count,
    # sharing, decoder, position encoding).
    encoder = model.encoder
    encoder.update(num_latents=8, latent_dim=16, num_self_heads=2,
                   num_self_attends_per_block=1,
                   num_cross_attends=min(encoder.num_cross_attends, 2),
                   num_blocks=2)
    pre = model.preprocessor
    if pre.position_encoding_type == 'fourier':
      # The conv's 4x downsample: 16x16 images -> a 4x4 grid.
      size = 4 if pre.prep_type == 'conv' else 16
      pre.update(num_freq_bands=4, max_resolution=(size, size))
    else:
      pre.learned_pos_channels = 8
    if pre.prep_type in ('conv', 'conv1x1'):
      pre.conv_channels = 8
    if pre.get('project_pos_dim'):
      pre.project_pos_dim = 8
    if model.decoder.type == 'query':
      model.decoder.query_channels = 16
    data.update(input_shape=(16, 16, 3), image_size=16, randaugment_layers=1)
    batch_size, eval_batch_size, training_steps = 16, 16, 4

  experiment = ml_collections.ConfigDict(dict(
      experiment='classification', data=data, model=model,
      optimizer=optimizer,
      training=dict(batch_size=batch_size, label_smoothing=0.1,
                    precision='auto', data_seed=options.seed,
                    log_every_steps=100, total_steps=training_steps),
      evaluation=dict(batch_size=eval_batch_size, per_class_metrics=False),
  ))
  config = common.jaxline_config(
      experiment=experiment, training_steps=training_steps,
      checkpoint_dir=f'/tmp/perceiver_jax/{name}',
      save_checkpoint_interval=2000, log_interval=100)
  config.random_seed = options.seed
  exp = config.experiment_kwargs.config
  exp.training.total_steps = config.get_ref('training_steps')
  config.lock()
  return config
