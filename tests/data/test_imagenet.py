"""The ImageNet loader on a tiny ILSVRC-2012 built by the real tfds builder."""

import collections
import io
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import imagenet as imagenet_config
from perceiver_jax.data import image_ops
from perceiver_jax.data import imagenet
from tests.data import ilsvrc_fixture

# The session fixture: the tiny ImageNet built once by the real builder.
imagenet_fixture = ilsvrc_fixture.imagenet_fixture

IMAGE_SIZE = 32


def _config(fixture, **overrides):
  config = imagenet.default_config()
  config.data_dir = fixture.data_dir
  config.image_size = IMAGE_SIZE
  config.update(overrides)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_real_builder_on_the_fixture(imagenet_fixture):
  builder = tfds.builder('imagenet2012', data_dir=imagenet_fixture.data_dir)
  assert builder.info.splits['train'].num_examples == imagenet_fixture.num_train
  assert builder.info.splits['validation'].num_examples == 10
  val = {ex['file_name'].decode(): int(ex['label']) for ex in
         tfds.as_numpy(builder.as_dataset('validation'))}
  # The builder's bundled labels line up with the fixture's file numbers.
  assert val == {f'ILSVRC2012_val_{k + 1:08d}.JPEG': label
                 for k, label in enumerate(imagenet_fixture.val_labels)}
  train = sorted(int(ex['label']) for ex in
                 tfds.as_numpy(builder.as_dataset('train')))
  assert tuple(train) == imagenet_fixture.train_labels
  assert imagenet.num_examples(
      'validation', _config(imagenet_fixture)) == 10


def test_training_batches(imagenet_fixture):
  it = imagenet.load(_config(imagenet_fixture), 'train', is_training=True,
                     batch_dims=(8, 2), seed=0)
  batches = _take(it, 3)  # 48 > 30 examples: the iterator repeats.
  for batch in batches:
    assert set(batch) == {'inputs', 'label', 'mask'}
    assert batch['inputs'].shape == (8, 2, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch['inputs'].dtype == np.float32
    assert batch['label'].shape == (8, 2)
    assert batch['label'].dtype == np.int32
    np.testing.assert_array_equal(batch['mask'], np.ones([8, 2], np.float32))
    assert set(batch['label'].ravel()) <= set(imagenet_fixture.train_labels)
    # Normalised: (0 - mean) / std .. (255 - mean) / std.
    assert -2.2 <= batch['inputs'].min() and batch['inputs'].max() <= 2.7
    assert 0.3 < batch['inputs'].std() < 2.0


def test_training_is_reproducible_with_deterministic(imagenet_fixture):
  config = _config(imagenet_fixture, deterministic=True)
  run = lambda seed: _take(imagenet.load(
      config, 'train', is_training=True, batch_dims=(2, 4), seed=seed), 2)
  first, again, other = run(0), run(0), run(1)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['inputs'], b['inputs'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(first[0]['inputs'], other[0]['inputs'])


def test_mixup_cutmix_soft_labels(imagenet_fixture):
  config = _config(imagenet_fixture, mixup_alpha=0.2, cutmix_alpha=1.0,
                   randaugment_layers=0)
  batch = next(imagenet.load(config, 'train', is_training=True,
                             batch_dims=(8, 2), seed=0))
  probs = batch['label_probs']
  assert probs.shape == (8, 2, 1000) and probs.dtype == np.float32
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  assert np.all(probs >= 0)
  support = np.flatnonzero(probs.reshape(-1, 1000).sum(0))
  assert set(support) <= set(imagenet_fixture.train_labels)
  # The unmixed label is among each example's mixed classes.
  own = np.take_along_axis(probs, batch['label'][..., None], -1)
  assert np.all(own > 0)


@pytest.mark.parametrize('batch_dims', [(2, 3), (8, 2), (1, 10)])
def test_eval_counts_every_image_once(imagenet_fixture, batch_dims):
  batches = list(imagenet.load(_config(imagenet_fixture), 'validation',
                               is_training=False, batch_dims=batch_dims,
                               seed=0))
  assert len(batches) == -(-10 // np.prod(batch_dims))
  masks = np.stack([b['mask'] for b in batches])
  assert masks.sum() == 10
  labels = np.stack([b['label'] for b in batches])[masks > 0]
  assert collections.Counter(labels.tolist()) == collections.Counter(
      imagenet_fixture.val_labels)
  inputs = np.stack([b['inputs'] for b in batches])
  assert inputs.shape[1:] == (*batch_dims, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert np.all(inputs[masks == 0] == 0)
  assert np.all(np.abs(inputs[masks > 0]).max(axis=(1, 2, 3)) > 0)


def test_eval_hosts_share_the_split_and_stay_in_step(imagenet_fixture):
  config = _config(imagenet_fixture)
  per_host = [
      list(tfds.as_numpy(imagenet.make_dataset(
          config, 'validation', is_training=False, batch_dims=(1, 3), seed=0,
          process_index=i, process_count=3))) for i in range(3)]
  # Shares of 4, 3, 3 images: every host runs the same 2 eval steps.
  assert [len(b) for b in per_host] == [2, 2, 2]
  labels = [int(l) for host in per_host for b in host
            for l, m in zip(b['label'].ravel(), b['mask'].ravel()) if m]
  assert collections.Counter(labels) == collections.Counter(
      imagenet_fixture.val_labels)


def test_eval_is_deterministic(imagenet_fixture):
  config = _config(imagenet_fixture)
  run = lambda: next(imagenet.load(config, 'validation', is_training=False,
                                   batch_dims=(2, 5), seed=0))
  np.testing.assert_array_equal(run()['inputs'], run()['inputs'])


def test_missing_data_dir_says_how_to_prepare(tmp_path):
  config = imagenet.default_config()
  config.data_dir = str(tmp_path / 'nothing')
  with pytest.raises(FileNotFoundError) as error:
    imagenet.load(config, 'train', is_training=True, batch_dims=(1, 1),
                  seed=0)
  message = str(error.value)
  assert 'tfds build imagenet2012' in message
  assert 'ILSVRC2012_img_train.tar' in message
  assert 'ILSVRC2012_img_val.tar' in message
  assert 'manual_dir' in message


def test_missing_manual_tars_are_named(tmp_path):
  config = imagenet.default_config()
  config.data_dir = str(tmp_path / 'tfds')
  config.manual_dir = str(tmp_path / 'manual')
  os.makedirs(config.manual_dir)
  open(os.path.join(config.manual_dir, 'ILSVRC2012_img_val.tar'), 'w').close()
  with pytest.raises(FileNotFoundError, match=r"lacks \['ILSVRC2012_img_"
                     r"train.tar'\]"):
    imagenet.get_builder(config)


def test_unsupported_prepared_version(tmp_path):
  old = tmp_path / 'imagenet2012' / '3.0.0'
  os.makedirs(old)
  (old / 'dataset_info.json').write_text('{}')
  config = imagenet.default_config()
  config.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match=r"\['3.0.0'\].*tfds_version"):
    imagenet.get_builder(config)
  config.tfds_version = '9.9.9'
  with pytest.raises(ValueError, match="tfds_version='9.9.9'"):
    imagenet.get_builder(config)


def test_other_bad_inputs(imagenet_fixture):
  with pytest.raises(ValueError, match="needs \\['test'\\]"):
    imagenet.load(_config(imagenet_fixture), 'test', is_training=False,
                  batch_dims=(1, 1), seed=0)
  with pytest.raises(ValueError, match='randaugment_magnitude'):
    imagenet.load(_config(imagenet_fixture, randaugment_magnitude=12.0),
                  'train', is_training=True, batch_dims=(1, 1), seed=0)
  with pytest.raises(ValueError, match='fewer than one batch'):
    imagenet.load(_config(imagenet_fixture), 'train', is_training=True,
                  batch_dims=(8, 4), seed=0)
  with pytest.raises(ValueError, match='batch_dims'):
    imagenet.load(_config(imagenet_fixture), 'train', is_training=True,
                  batch_dims=(8,), seed=0)


def test_builds_from_manual_dir_on_first_use(imagenet_fixture, tmp_path):
  config = _config(imagenet_fixture, data_dir=str(tmp_path / 'tfds'),
                   manual_dir=imagenet_fixture.manual_dir)
  assert imagenet.prepared_versions(config.data_dir) == []
  batch = next(imagenet.load(config, 'validation', is_training=False,
                             batch_dims=(1, 10), seed=0))
  assert imagenet.prepared_versions(config.data_dir) == ['5.1.0']
  assert sorted(batch['label'].ravel()) == sorted(imagenet_fixture.val_labels)


def test_default_config_holds_the_paper_values():
  config = imagenet.default_config()
  assert (config.image_size, config.randaugment_layers,
          config.randaugment_magnitude) == (224, 4, 5.0)
  assert config.eval_crop_fraction == 224 / 256
  assert imagenet.num_examples('train') == 1_281_167
  assert imagenet.num_examples('validation') == 50_000
  assert ilsvrc_fixture.label_names()[0] == 'n01440764'


# Evaluation preprocessing: the released one (perceiver_jax/data/imagenet.py).


def _released_eval(data: bytes, size: int) -> np.ndarray:
  """deepmind-research perceiver/train/dataset.py's eval, re-derived.

  The centre crop of side int(224 / 256 * min(H, W)) (a JPEG decodes only
  that window, as there; other formats decode whole, then crop), bicubic
  tf.image.resize without clipping, then (x - MEAN_RGB) / STDDEV_RGB with
  MEAN_RGB = 255 * (0.485, 0.456, 0.406), STDDEV_RGB = 255 * (0.229, 0.224,
  0.225).
  """
  is_jpeg = bool(tf.io.is_jpeg(data))
  if is_jpeg:
    height, width = tf.image.extract_jpeg_shape(data).numpy()[:2]
  else:
    image = tf.io.decode_image(data, channels=3).numpy()
    height, width = image.shape[:2]
  side = int(224 / (224 + 32) * np.float32(min(height, width)))
  y, x = (height - side + 1) // 2, (width - side + 1) // 2
  if is_jpeg:
    crop = tf.image.decode_and_crop_jpeg(data, [y, x, side, side],
                                         channels=3)
  else:
    crop = image[y:y + side, x:x + side]
  resized = tf.image.resize(crop, (size, size),
                            tf.image.ResizeMethod.BICUBIC).numpy()
  mean = np.array([0.485, 0.456, 0.406]) * 255
  std = np.array([0.229, 0.224, 0.225]) * 255
  return ((resized - mean) / std).astype(np.float32)


def _edges(height: int, width: int) -> np.ndarray:
  """Sharp-edged colour blocks, uint8 [H, W, 3]: bicubic overshoots."""
  rng = np.random.default_rng(0)
  blocks = rng.choice([0, 255], size=(height // 4 + 1, width // 4 + 1, 3))
  return np.kron(blocks, np.ones([4, 4, 1]))[:height, :width].astype(
      np.uint8)


def _encode(image: np.ndarray, fmt: str) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).save(out, format=fmt, quality=95, subsampling=0)
  return out.getvalue()


@pytest.mark.parametrize('fmt', ['PNG', 'JPEG'])
def test_eval_preprocess_is_the_released_eval(fmt):
  image = _edges(45, 70)
  data = _encode(image, fmt)
  expected = _released_eval(data, 24)
  preprocess = lambda b: imagenet.eval_preprocess(b, image_size=24)
  eager = preprocess(tf.constant(data)).numpy()
  in_tf_data = tf.data.Dataset.from_tensors(data).map(
      preprocess).get_single_element().numpy()
  assert eager.shape == (24, 24, 3) and eager.dtype == np.float32
  np.testing.assert_allclose(eager, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(eager, in_tf_data)
  # Not clipped: bicubic's overshoot past 0 and 255 survives normalisation.
  lo = (0 - np.array(image_ops.MEAN_RGB)) / np.array(image_ops.STDDEV_RGB)
  hi = (255 - np.array(image_ops.MEAN_RGB)) / np.array(image_ops.STDDEV_RGB)
  assert np.any(eager < lo - 0.05) and np.any(eager > hi + 0.05)


def test_eval_pipeline_applies_eval_preprocess(imagenet_fixture):
  config = _config(imagenet_fixture)
  batch = next(imagenet.load(config, 'validation', is_training=False,
                             batch_dims=(1, 10), seed=0))
  raw = imagenet.get_builder(config).as_dataset(
      'validation', decoders={'image': tfds.decode.SkipDecoding()})
  for k, example in enumerate(raw.take(10)):
    np.testing.assert_allclose(
        batch['inputs'][0, k],
        _released_eval(example['image'].numpy(), IMAGE_SIZE),
        rtol=1e-5, atol=1e-4)


def test_load_eval_image_reads_files_as_the_eval_does(tmp_path):
  image = _edges(60, 50)
  p2_data = imagenet_config.get_config('p2').experiment_kwargs.config.data
  for fmt, suffix in (('JPEG', 'jpg'), ('PNG', 'png')):
    path = tmp_path / f'image.{suffix}'
    path.write_bytes(_encode(image, fmt))
    out = imagenet.load_eval_image(str(path), p2_data)
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, imagenet.eval_preprocess(
        tf.constant(path.read_bytes()), image_size=224).numpy())
    np.testing.assert_allclose(out, _released_eval(path.read_bytes(), 224),
                               rtol=1e-5, atol=1e-5)


def test_load_eval_image_errors_name_the_file(tmp_path):
  config = imagenet.default_config()
  missing = tmp_path / 'missing.jpg'
  with pytest.raises(FileNotFoundError, match='missing.jpg'):
    imagenet.load_eval_image(str(missing), config)
  junk = tmp_path / 'junk.png'
  junk.write_bytes(b'not an image')
  with pytest.raises(ValueError, match='Cannot decode .*junk.png'):
    imagenet.load_eval_image(str(junk), config)
  with pytest.raises(ValueError, match='Cannot read'):
    imagenet.load_eval_image(str(tmp_path), config)
