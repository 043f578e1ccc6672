"""ImageNet (ILSVRC-2012) from tfds `imagenet2012`: the P1/P2 input pipeline.

Reads a prepared tfds data dir (local or gs://) with no download. When the
data are not prepared there and `manual_dir` holds the two ILSVRC-2012 tars,
the real tfds builder prepares them first (once; single host only):

  tfds build imagenet2012 --data_dir=DATA_DIR --manual_dir=MANUAL_DIR

does the same ahead of time; MANUAL_DIR must hold ILSVRC2012_img_train.tar
and ILSVRC2012_img_val.tar (from https://image-net.org/download-images).

Preprocessing (P2 App. A.1; the released Perceiver code):
  train: fused JPEG decode + Inception crop (area 0.08-1, aspect 3/4-4/3),
         bicubic resize to image_size, random flip, RandAugment (4 layers,
         magnitude 5), mean/std normalisation; optionally CutMix then MixUp
         on each host batch (P2: MixUp 0.2 + CutMix), adding soft labels.
  eval:  fused decode of the centre 224/256 of the short side, bicubic
         resize without clipping its overshoot, normalisation: the released
         evaluation (deepmind-research perceiver/train/dataset.py), which the
         released checkpoints' published accuracies come from. Its colab
         differs slightly (OpenCV's bicubic, a = -0.75, rounded to uint8);
         we follow the evaluation code. `load_eval_image` applies the same
         to one image file (JPEG, PNG, GIF, BMP).

Batches follow perceiver_jax.data.common: 'inputs' float32 [*batch_dims, S,
S, 3] normalised (S = image_size), 'label' int32 [*batch_dims], 'mask'
float32 [*batch_dims]; with MixUp/CutMix also 'label_probs' float32
[*batch_dims, 1000] (rows sum to 1; 'label' stays the unmixed class). Each
host reads its own contiguous share of the split (tfds.even_splits by
jax.process_index()). Evaluation makes exactly one pass and pads with mask-0
examples so that every host yields the same number of batches and every
image is counted exactly once, for any batch size.

Config fields read (see `default_config`):
  data_dir: tfds data dir holding imagenet2012/<version> (local or gs://);
    None for tfds' default (~/tensorflow_datasets).
  manual_dir: directory of the ILSVRC-2012 tars, used only to build data
    missing from data_dir; None to never build.
  tfds_version: imagenet2012 version to read ('5.1.0' or '5.0.0'); None for
    the newest supported one present.
  image_size: side S of the square crops fed to the model (224).
  randaugment_layers, randaugment_magnitude: RandAugment (4, 5); 0 layers
    turns it off.
  mixup_alpha, cutmix_alpha: Beta concentrations; 0 turns each off. Mixing
    follows DeepMind's released recipe (deepmind-research
    perceiver/train/dataset.py `load` and `my_mixup_cutmix`): each group of
    two per-device batches (2n examples) makes one batch of n, half MixUp
    (lam ~ Beta(mixup_alpha, mixup_alpha) per example) and half CutMix (box
    proportion ~ Beta(cutmix_alpha, cutmix_alpha) per example, 1.0 as
    released), every example mixed with another example of its group; with
    one of them off, all n get the other. Training thus reads two examples
    per example trained on. Details: `image_ops.mix_group`.
  eval_crop_fraction: centre crop as a fraction of the short side (224/256).
  shuffle_buffer: training shuffle buffer, in examples.
  deterministic: if True, tf.data keeps element order so a seed reproduces
    the same training batches; False lets parallel stages reorder (faster).
    Evaluation always keeps order.
  threadpool_size: tf.data private thread pool size (0: TF's default).
"""

import math
import os
import re
from typing import Iterator, Optional, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from perceiver_jax.data import common
from perceiver_jax.data import image_ops

DATASET = 'imagenet2012'
NUM_CLASSES = 1000
SPLIT_SIZES = {'train': 1_281_167, 'validation': 50_000}
MANUAL_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')

_PREPARE_HELP = (
    'Prepare it once with\n'
    '  tfds build imagenet2012 --data_dir={data_dir} --manual_dir=MANUAL_DIR\n'
    'where MANUAL_DIR holds ILSVRC2012_img_train.tar and '
    'ILSVRC2012_img_val.tar (register at '
    'https://image-net.org/download-images), or set data.manual_dir=MANUAL_DIR '
    'to build it on first use.')


def default_config() -> ml_collections.ConfigDict:
  """The data section with the paper's values (P1 Tab. 1, P2 App. A.1).

  MixUp/CutMix are off (P1); P2 uses mixup_alpha=0.2, cutmix_alpha=1.0.
  """
  return ml_collections.ConfigDict(dict(
      name='imagenet', train_split='train', eval_split='validation',
      num_train_examples=SPLIT_SIZES['train'], num_classes=NUM_CLASSES,
      input_shape=(224, 224, 3), image_size=224,
      data_dir=ml_collections.FieldReference(None, field_type=str),
      manual_dir=ml_collections.FieldReference(None, field_type=str),
      tfds_version=ml_collections.FieldReference(None, field_type=str),
      randaugment_layers=4, randaugment_magnitude=5.0,
      mixup_alpha=0.0, cutmix_alpha=0.0,
      eval_crop_fraction=image_ops.EVAL_CROP_FRACTION,
      shuffle_buffer=10_000, deterministic=False, threadpool_size=48))


def num_examples(split: str,
                 config: Optional[ml_collections.ConfigDict] = None) -> int:
  """Examples in `split`: of the prepared data if `config` is given, else
  the full ILSVRC-2012 counts ('train', 'validation')."""
  if config is not None:
    builder = get_builder(config)
    _check_split(builder, split)
    return builder.info.splits[split].num_examples
  if split not in SPLIT_SIZES:
    raise ValueError(f'Unknown ImageNet split {split!r}; expected one of '
                     f'{sorted(SPLIT_SIZES)} (or pass the config).')
  return SPLIT_SIZES[split]


def load(config: ml_collections.ConfigDict, split: str, *, is_training: bool,
         batch_dims: Sequence[int], seed: int,
         start_step: int = 0) -> Iterator[common.Batch]:
  """Iterates over this host's share of an ImageNet split.

  Args:
    config: the data section (fields in the module docstring).
    split: tfds split, e.g. 'train', 'validation', 'train[:10000]'.
    is_training: infinite, shuffled, augmented batches if True; else one
      ordered pass, padded and masked.
    batch_dims: (num_local_devices, per_device_batch).
    seed: shuffling and augmentation seed (training only).
    start_step: training steps already taken (a resumed run); the stream is
      reseeded from (seed, start_step) rather than replayed from the start.

  Returns:
    An iterator of NumPy batches (see the module docstring).

  Raises:
    FileNotFoundError: no prepared data and no usable manual tars.
    ValueError: bad config values, split, or an unsupported prepared version.
  """
  if start_step:
    seed = int(np.random.SeedSequence([seed, start_step]).generate_state(1)[0]
               % 2**31)
  dataset = make_dataset(config, split, is_training=is_training,
                         batch_dims=batch_dims, seed=seed)
  return iter(tfds.as_numpy(dataset))


def make_dataset(config: ml_collections.ConfigDict, split: str, *,
                 is_training: bool, batch_dims: Sequence[int], seed: int,
                 process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> tf.data.Dataset:
  """The tf.data pipeline behind `load` (same arguments).

  Args:
    config: the data section.
    split: tfds split.
    is_training: see `load`.
    batch_dims: (num_local_devices, per_device_batch).
    seed: see `load`.
    process_index: this host; default jax.process_index().
    process_count: hosts; default jax.process_count().

  Returns:
    A dataset of dicts of tensors shaped as the batch contract says.
  """
  batch_dims = common.check_batch_dims(batch_dims)
  options = _read_options(config)
  if not is_training:
    options['deterministic'] = True  # Cheap here; fixed eval order.
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  common.host_shard_bounds(0, process_index, process_count)  # Validates.
  hide_gpus_from_tensorflow()
  builder = get_builder(config)
  _check_split(builder, split)
  host_splits = tfds.even_splits(split, n=process_count, drop_remainder=False)
  host_split = host_splits[process_index]
  batch_size = math.prod(batch_dims)

  decoders = {'image': tfds.decode.SkipDecoding()}
  read_config = tfds.ReadConfig(shuffle_seed=seed,
                                options=_tf_data_options(options))
  ds = builder.as_dataset(split=host_split, shuffle_files=is_training,
                          decoders=decoders, read_config=read_config)
  num_classes = builder.info.features['label'].num_classes

  if is_training:
    host_size = builder.info.splits[host_split].num_examples
    if host_size < batch_size:
      raise ValueError(
          f'This host holds {host_size} training examples of {split!r}, '
          f'fewer than one batch of {batch_size}; lower the batch size.')
    ds = ds.repeat().shuffle(options['shuffle_buffer'], seed=seed)
    # The running index seeds each example's augmentation, so an example's
    # crop does not depend on which thread preprocesses it.
    example_seed = tf.constant([seed, 1], tf.int64)

    def train_map(index, example):
      return _train_example(
          example, tf.random.experimental.stateless_fold_in(
              example_seed, index), options)

    ds = ds.enumerate().map(train_map, num_parallel_calls=tf.data.AUTOTUNE)
    if options['mixup_alpha'] > 0 or options['cutmix_alpha'] > 0:
      # As released: groups of two per-device batches make one mixed one.
      group_size = 2 * batch_dims[-1]
      mix_seed = tf.constant([seed, 2], tf.int64)

      def mix_map(step, group):
        return _mix_group(group, tf.random.experimental.stateless_fold_in(
            mix_seed, step), options, num_classes)

      ds = ds.batch(group_size, drop_remainder=True).enumerate().map(
          mix_map, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    ds = ds.batch(batch_size, drop_remainder=True)
  else:
    ds = ds.map(lambda ex: _eval_example(ex, options),
                num_parallel_calls=tf.data.AUTOTUNE)
    # Every host yields as many batches as the largest share needs.
    sizes = [builder.info.splits[s].num_examples for s in host_splits]
    num_batches = -(-max(sizes) // batch_size)
    num_padding = num_batches * batch_size - sizes[process_index]
    size = options['image_size']
    padding = tf.data.Dataset.from_tensors({
        'inputs': tf.zeros([size, size, 3], tf.float32),
        'label': tf.constant(0, tf.int32),
        'mask': tf.constant(0.0, tf.float32),
    }).repeat(num_padding)
    ds = ds.concatenate(padding).batch(batch_size, drop_remainder=True)

  ds = ds.map(lambda batch: _reshape(batch, batch_dims),
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.with_options(_tf_data_options(options))
  return ds.prefetch(tf.data.AUTOTUNE)


def get_builder(config: ml_collections.ConfigDict
                ) -> tfds.core.DatasetBuilder:
  """The imagenet2012 builder of `config.data_dir`, prepared.

  Builds the data from `config.manual_dir` if they are missing there.

  Args:
    config: the data section (data_dir, manual_dir, tfds_version).

  Returns:
    A builder whose `as_dataset` reads the prepared data (no download).

  Raises:
    FileNotFoundError: nothing prepared and no (complete) manual tars.
    ValueError: only unsupported versions are prepared, or the asked
      tfds_version is unsupported or missing.
    RuntimeError: building was needed on a multi-host job.
  """
  data_dir = config.get('data_dir') or tfds.core.constants.DATA_DIR
  manual_dir = config.get('manual_dir')
  version = config.get('tfds_version')
  supported = supported_versions()
  if version is not None and version not in supported:
    raise ValueError(
        f'tfds_version={version!r} is not readable by tensorflow-datasets '
        f'{tfds.__version__}, which supports imagenet2012 '
        f'{list(supported)}.')
  dataset_dir = os.path.join(data_dir, DATASET)
  prepared = prepared_versions(data_dir)
  readable = [v for v in supported if v in prepared]
  if version is None and readable:
    version = readable[0]
  if version in prepared:
    return tfds.builder(f'{DATASET}:{version}', data_dir=data_dir)
  if prepared and not manual_dir:
    raise ValueError(
        f'{dataset_dir} holds imagenet2012 version(s) {prepared}, but '
        f'tensorflow-datasets {tfds.__version__} reads '
        f'{version or list(supported)}. Set data.tfds_version to '
        'one of those present and supported, or rebuild with this tfds: '
        + _PREPARE_HELP.format(data_dir=data_dir))
  if not manual_dir:
    raise FileNotFoundError(
        f'No prepared imagenet2012 under data_dir={data_dir!r} (looked for '
        f'{dataset_dir}/<version>/dataset_info.json). '
        + _PREPARE_HELP.format(data_dir=data_dir))
  missing = [t for t in MANUAL_TARS
             if not tf.io.gfile.exists(os.path.join(manual_dir, t))]
  if missing:
    raise FileNotFoundError(
        f'No prepared imagenet2012 under data_dir={data_dir!r}, and '
        f'manual_dir={manual_dir!r} lacks {missing}. Put '
        f'{" and ".join(MANUAL_TARS)} (from '
        'https://image-net.org/download-images, unextracted) in manual_dir.')
  if jax.process_count() > 1:
    raise RuntimeError(
        'imagenet2012 must be prepared before a multi-host run: '
        + _PREPARE_HELP.format(data_dir=data_dir))
  builder = tfds.builder(f'{DATASET}:{version or supported[0]}',
                         data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def prepared_versions(data_dir: str) -> list[str]:
  """Versions of imagenet2012 fully prepared in data_dir, newest first."""
  dataset_dir = os.path.join(data_dir, DATASET)
  if not tf.io.gfile.isdir(dataset_dir):
    return []
  versions = []
  for name in tf.io.gfile.listdir(dataset_dir):
    name = name.rstrip('/')
    if (re.fullmatch(r'\d+\.\d+\.\d+', name) and tf.io.gfile.exists(
        os.path.join(dataset_dir, name, 'dataset_info.json'))):
      versions.append(name)
  return sorted(versions, key=lambda v: tuple(map(int, v.split('.'))),
                reverse=True)


def supported_versions() -> tuple[str, ...]:
  """imagenet2012 versions the installed tfds reads, its default first.

  tfds 4.9: ('5.1.0', '5.0.0').
  """
  builder_cls = tfds.builder_cls(DATASET)
  return tuple(str(v) for v in [builder_cls.VERSION,
                                *builder_cls.SUPPORTED_VERSIONS])


def hide_gpus_from_tensorflow() -> None:
  """Keeps TensorFlow off the GPUs (their memory belongs to JAX)."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    # TF already initialised its devices; with tensorflow-cpu there are none.
    pass


def train_preprocess(image_bytes: tf.Tensor, seed: tf.Tensor, *,
                     image_size: int, randaugment_layers: int,
                     randaugment_magnitude: float) -> tf.Tensor:
  """JPEG bytes -> augmented, normalised float32 [S, S, 3] (see docstring)."""
  crop_seed, flip_seed, augment_seed = image_ops.split_seed(seed, 3)
  image = image_ops.decode_and_random_crop(image_bytes, crop_seed)
  image = image_ops.resize(image, image_size)
  image = image_ops.random_flip(image, flip_seed)
  if randaugment_layers:
    image = image_ops.randaugment(
        image_ops.to_uint8(image), augment_seed,
        num_layers=randaugment_layers, magnitude=randaugment_magnitude)
  return image_ops.normalize(image)


def eval_preprocess(image_bytes: tf.Tensor, *, image_size: int,
                    crop_fraction: float = image_ops.EVAL_CROP_FRACTION
                    ) -> tf.Tensor:
  """Image bytes -> centre-cropped, normalised float32 [S, S, 3].

  As the released evaluation: the centred square of side
  int(crop_fraction * min(H, W)) at offsets ((H - side + 1) // 2,
  (W - side + 1) // 2), bicubic resize to S (not clipped to [0, 255]), then
  (x - MEAN_RGB) / STDDEV_RGB.

  Args:
    image_bytes: scalar string, a JPEG (ImageNet) or PNG, GIF, BMP file.
    image_size: S.
    crop_fraction: centre crop as a fraction of the short side.

  Returns:
    float32 [S, S, 3].
  """
  image = image_ops.decode_and_center_crop(image_bytes, crop_fraction)
  return image_ops.normalize(image_ops.resize(image, image_size, clip=False))


def load_eval_image(path: str, config: ml_collections.ConfigDict
                    ) -> np.ndarray:
  """One image file, preprocessed exactly as `config`'s evaluation does.

  Args:
    path: a JPEG, PNG, GIF or BMP file (local or gs://).
    config: the data section (image_size, eval_crop_fraction).

  Returns:
    float32 [S, S, 3], as in the 'inputs' of an evaluation batch.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if it cannot be read or decoded as an image, or for bad
      config values.
  """
  options = _read_options(config)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f'Image file {path} does not exist.')
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      data = f.read()
  except (OSError, tf.errors.OpError) as e:
    raise ValueError(f'Cannot read image file {path}: {e}') from e
  hide_gpus_from_tensorflow()
  try:
    image = eval_preprocess(
        tf.constant(data), image_size=options['image_size'],
        crop_fraction=options['eval_crop_fraction'])
  except tf.errors.OpError as e:
    raise ValueError(
        f'Cannot decode {path} as an image (JPEG, PNG, GIF or BMP): '
        f'{e.message}') from e
  return image.numpy()


def _train_example(example, seed, options):
  image = train_preprocess(
      example['image'], seed, image_size=options['image_size'],
      randaugment_layers=options['randaugment_layers'],
      randaugment_magnitude=options['randaugment_magnitude'])
  return {'inputs': image, 'label': tf.cast(example['label'], tf.int32),
          'mask': tf.constant(1.0, tf.float32)}


def _eval_example(example, options):
  image = eval_preprocess(example['image'], image_size=options['image_size'],
                          crop_fraction=options['eval_crop_fraction'])
  return {'inputs': image, 'label': tf.cast(example['label'], tf.int32),
          'mask': tf.constant(1.0, tf.float32)}


def _mix_group(group, seed, options, num_classes):
  """MixUp/CutMix of 2n examples into n, as released (`image_ops.mix_group`).

  Keeps each output's own 'label' (for accuracy, as the released metrics)
  and adds 'label_probs' [n, K], the mixed one-hot labels.
  """
  mixed = image_ops.mix_group(
      group['inputs'], group['label'], seed,
      mixup_alpha=options['mixup_alpha'], cutmix_alpha=options['cutmix_alpha'])
  probs = image_ops.mixed_label_probs(mixed['label'], mixed['mix_label'],
                                      mixed['ratio'], num_classes)
  return {'inputs': mixed['inputs'], 'label': mixed['label'],
          'mask': tf.ones_like(mixed['ratio']), 'label_probs': probs}


def _reshape(batch, batch_dims):
  return {k: tf.reshape(v, list(batch_dims) + v.shape[1:].as_list())
          for k, v in batch.items()}


def _tf_data_options(options) -> tf.data.Options:
  tf_options = tf.data.Options()
  tf_options.deterministic = options['deterministic']
  tf_options.autotune.enabled = True
  tf_options.experimental_optimization.map_parallelization = True
  if options['threadpool_size']:
    tf_options.threading.private_threadpool_size = options['threadpool_size']
  tf_options.threading.max_intra_op_parallelism = 1
  return tf_options


def _read_options(config: ml_collections.ConfigDict) -> dict[str, object]:
  """Reads and validates the preprocessing fields, with defaults."""
  defaults = default_config()
  get = lambda name: config.get(name, defaults[name])
  options = {
      'image_size': int(get('image_size')),
      'randaugment_layers': int(get('randaugment_layers')),
      'randaugment_magnitude': float(get('randaugment_magnitude')),
      'mixup_alpha': float(get('mixup_alpha') or 0.0),
      'cutmix_alpha': float(get('cutmix_alpha') or 0.0),
      'eval_crop_fraction': float(get('eval_crop_fraction')),
      'shuffle_buffer': int(get('shuffle_buffer')),
      'deterministic': bool(get('deterministic')),
      'threadpool_size': int(get('threadpool_size') or 0),
  }
  checks = {
      'image_size': options['image_size'] >= 1,
      'randaugment_layers': options['randaugment_layers'] >= 0,
      'randaugment_magnitude': (
          0 <= options['randaugment_magnitude'] <= image_ops.MAX_MAGNITUDE),
      'mixup_alpha': options['mixup_alpha'] >= 0,
      'cutmix_alpha': options['cutmix_alpha'] >= 0,
      'eval_crop_fraction': 0 < options['eval_crop_fraction'] <= 1,
      'shuffle_buffer': options['shuffle_buffer'] >= 1,
      'threadpool_size': options['threadpool_size'] >= 0,
  }
  bad = {k: options[k] for k, ok in checks.items() if not ok}
  if bad:
    raise ValueError(
        f'Bad ImageNet data config values {bad}: image_size and '
        'shuffle_buffer must be >= 1, randaugment_layers, mixup_alpha, '
        'cutmix_alpha and threadpool_size >= 0, randaugment_magnitude in '
        '[0, 10], eval_crop_fraction in (0, 1].')
  return options


def _check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
  """ValueError naming the prepared splits if `split` needs another one."""
  available = set(builder.info.splits.keys())
  # 'train[:10%]+validation' -> {'train', 'validation'}.
  wanted = {re.split(r'[\[(]', part.strip())[0] for part in split.split('+')}
  missing = sorted(wanted - available)
  if missing:
    raise ValueError(
        f'Split {split!r} needs {missing}, but the imagenet2012 prepared in '
        f'{builder.data_dir} has only {sorted(available)}. Rebuild it with '
        f'{" and ".join(MANUAL_TARS)} in manual_dir to get both splits.')
