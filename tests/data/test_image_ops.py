"""Every op of perceiver_jax.data.image_ops, eagerly and inside tf.data."""

import io

import numpy as np
from PIL import Image
from PIL import ImageOps
import pytest
import tensorflow as tf

from perceiver_jax.data import image_ops

MAGNITUDE = 5.0  # P2's RandAugment magnitude.


def _photo(height: int = 36, width: int = 48) -> np.ndarray:
  """A real photograph (scikit-image's coffee, CC0), uint8 [H, W, 3]."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  image = Image.fromarray(data.coffee()).resize((width, height),
                                                Image.BILINEAR)
  return np.asarray(image)


def _jpeg(image: np.ndarray) -> bytes:
  out = io.BytesIO()
  # 4:4:4 chroma: no upsampling seams at crop edges, so fused == plain.
  Image.fromarray(image).save(out, format='JPEG', quality=95, subsampling=0)
  return out.getvalue()


def _seed(i: int) -> tf.Tensor:
  return tf.constant([i, 7], tf.int64)


def _in_tf_data(fn, *args):
  """Runs fn(*args) inside a tf.data map (graph mode) and returns NumPy."""
  ds = tf.data.Dataset.from_tensors(tuple(args)).map(lambda *a: fn(*a))
  return tf.nest.map_structure(lambda t: t.numpy(), ds.get_single_element())


def _both(fn, *args):
  """(eager output, tf.data output), asserted equal."""
  eager = tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
  graph = _in_tf_data(fn, *args)
  tf.nest.map_structure(np.testing.assert_array_equal, eager, graph)
  return eager


# Crops.


def test_inception_crop_window_bounds():
  shape = tf.constant([300, 400, 3])
  window = lambda sd: image_ops.inception_crop_window(shape, sd)
  seeds = tf.constant([[i, 7] for i in range(50)], tf.int64)
  graph = np.stack(list(
      tf.data.Dataset.from_tensor_slices(seeds).map(window)
      .as_numpy_iterator()))
  eager = np.stack([window(sd).numpy() for sd in seeds])
  np.testing.assert_array_equal(eager, graph)
  y, x, h, w = eager.T
  assert np.all((y >= 0) & (y + h <= 300) & (x >= 0) & (x + w <= 400))
  areas, aspects = h * w / (300 * 400), w / h
  # Integer rounding of the sides loosens the bounds slightly.
  assert 0.08 * 0.95 <= areas.min() and areas.max() <= 1.0
  assert 0.75 * 0.97 <= aspects.min() and aspects.max() <= 4 / 3 * 1.03
  assert areas.max() - areas.min() > 0.3  # Really random.


def test_inception_crop_falls_back_to_centre_crop():
  # 1000 x 10: no crop with aspect in [3/4, 4/3] covers 8% of the area.
  window = _both(lambda s, sd: image_ops.inception_crop_window(s, sd),
                 tf.constant([1000, 10, 3]), _seed(0))
  side = int(10 * 224 / 256)
  np.testing.assert_array_equal(window, [(1000 - side + 1) // 2, 1, side,
                                         side])


def test_centre_crop_is_224_of_256_of_the_short_side():
  window = _both(image_ops.center_crop_window, tf.constant([256, 320, 3]))
  np.testing.assert_array_equal(window, [16, 48, 224, 224])
  image = _photo(40, 64)
  out = _both(image_ops.center_crop, tf.constant(image))
  side = int(40 * 224 / 256)  # 35
  y, x = (40 - side + 1) // 2, (64 - side + 1) // 2
  np.testing.assert_array_equal(out, image[y:y + side, x:x + side])
  with pytest.raises(ValueError, match='crop_fraction=1.5'):
    image_ops.center_crop_window(tf.constant([4, 4, 3]), 1.5)


@pytest.mark.parametrize('shape', [(256, 320), (300, 200), (375, 500),
                                   (333, 333), (17, 40), (500, 9)])
def test_centre_crop_window_is_the_released_one(shape):
  # deepmind-research perceiver/train/dataset.py, _decode_and_center_crop.
  height, width = shape
  side = int(224 / (224 + 32) * np.float32(min(height, width)))
  expected = [(height - side + 1) // 2, (width - side + 1) // 2, side, side]
  window = _both(image_ops.center_crop_window,
                 tf.constant([height, width, 3]))
  np.testing.assert_array_equal(window, expected)


def _png(image: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).save(out, format='PNG')
  return out.getvalue()


def test_decode_and_center_crop_reads_png_grey_and_rgba():
  image = _photo(40, 64)
  side = int(40 * 224 / 256)
  y, x = (40 - side + 1) // 2, (64 - side + 1) // 2
  want = image[y:y + side, x:x + side]
  np.testing.assert_array_equal(
      _both(image_ops.decode_and_center_crop, tf.constant(_png(image))), want)
  grey = np.asarray(Image.fromarray(image).convert('L'))
  out = _both(image_ops.decode_and_center_crop, tf.constant(_png(grey)))
  np.testing.assert_array_equal(
      out, np.repeat(grey[y:y + side, x:x + side, None], 3, axis=-1))
  rgba = np.concatenate([image, np.full([40, 64, 1], 9, np.uint8)], -1)
  np.testing.assert_array_equal(
      _both(image_ops.decode_and_center_crop, tf.constant(_png(rgba))), want)


def test_fused_decode_and_crop_matches_decode_then_crop():
  image = _photo(60, 80)
  data = tf.constant(_jpeg(image))
  decoded = tf.io.decode_jpeg(data, channels=3)
  for i in range(3):
    fused = _both(image_ops.decode_and_random_crop, data, _seed(i))
    plain = image_ops.random_crop(decoded, _seed(i)).numpy()
    assert fused.dtype == np.uint8 and fused.shape[-1] == 3
    np.testing.assert_array_equal(fused, plain)
  centre = _both(image_ops.decode_and_center_crop, data)
  np.testing.assert_array_equal(
      centre, image_ops.center_crop(decoded).numpy())


def test_decode_grey_jpeg_gives_rgb():
  grey = np.asarray(Image.fromarray(_photo()).convert('L'))
  data = tf.constant(_jpeg(grey))
  out = _both(image_ops.decode_and_random_crop, data, _seed(0))
  assert out.shape[-1] == 3
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


# Resize, flip, normalise.


def test_resize_bicubic_shape_range_and_constant():
  out = _both(lambda im: image_ops.resize(im, 24), tf.constant(_photo()))
  assert out.shape == (24, 24, 3) and out.dtype == np.float32
  assert 0.0 <= out.min() and out.max() <= 255.0
  flat = np.full([9, 13, 3], 77, np.uint8)
  np.testing.assert_allclose(
      _both(lambda im: image_ops.resize(im, (5, 6)), tf.constant(flat)), 77.0,
      atol=1e-3)
  with pytest.raises(ValueError, match='size'):
    image_ops.resize(tf.constant(flat), 0)


def _keys_weights(size_in: int, size_out: int, a: float) -> np.ndarray:
  """[out, in] weights of a cubic resize with tf.image.resize's conventions.

  Half-pixel centres; Keys' cubic with parameter `a` at offsets rounded to
  1/1024 (TF's coefficient table); taps outside the image get weight 0 and
  the rest are renormalised to sum 1.
  """
  def keys(x):
    x = abs(x)
    if x <= 1:
      return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
      return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0

  weights = np.zeros([size_out, size_in])
  scale = size_in / size_out
  for o in range(size_out):
    x = (o + 0.5) * scale - 0.5
    start = int(np.floor(x))
    t = np.round((x - start) * 1024) / 1024
    for j in range(-1, 3):
      if 0 <= start + j < size_in:
        weights[o, start + j] = keys(j - t)
    weights[o] /= weights[o].sum()
  return weights


def _numpy_bicubic(image: np.ndarray, size: tuple[int, int],
                   a: float = -0.5) -> np.ndarray:
  rows = _keys_weights(image.shape[0], size[0], a)
  cols = _keys_weights(image.shape[1], size[1], a)
  return np.einsum('oh,hwc,pw->opc', rows, image.astype(np.float64), cols)


def _bars(height: int, width: int, period: int = 3) -> np.ndarray:
  """Black and white vertical bars, uint8 [H, W, 3]: bicubic overshoots."""
  row = np.where((np.arange(width) // period) % 2 == 0, 0, 255)
  return np.broadcast_to(row[None, :, None], [height, width, 3]).astype(
      np.uint8)


@pytest.mark.parametrize('size_in, size_out', [
    ((30, 40), (12, 16)),  # Down by 2.5: TF's offsets are exact.
    ((35, 29), (16, 16)),  # Arbitrary ratios.
    ((9, 7), (16, 20)),  # Up.
])
def test_resize_is_tf_bicubic_keys_half_pixel(size_in, size_out):
  image = _photo(*size_in)
  out = _both(lambda im: image_ops.resize(im, size_out, clip=False),
              tf.constant(image))
  expected = _numpy_bicubic(image, size_out)
  np.testing.assert_allclose(out, expected, atol=2e-3)
  # The test tells kernels apart: OpenCV's INTER_CUBIC (a = -0.75, DeepMind's
  # colab) is a different resize.
  assert np.abs(_numpy_bicubic(image, size_out, a=-0.75) - expected).max() > 1


def test_resize_clips_only_when_asked():
  bars = tf.constant(_bars(30, 40))
  raw = _both(lambda im: image_ops.resize(im, (12, 16), clip=False), bars)
  # The released evaluation keeps bicubic's overshoot past [0, 255].
  assert raw.min() < -5 and raw.max() > 260
  np.testing.assert_allclose(raw, _numpy_bicubic(_bars(30, 40), (12, 16)),
                             atol=2e-3)
  clipped = _both(lambda im: image_ops.resize(im, (12, 16)), bars)
  np.testing.assert_array_equal(clipped, np.clip(raw, 0, 255))


def test_random_flip():
  image = _photo()
  flipped = 0
  for i in range(16):
    out = _both(image_ops.random_flip, tf.constant(image), _seed(i))
    if np.array_equal(out, image[:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(out, image)
  assert 0 < flipped < 16


def test_normalisation_constants_are_the_released_ones():
  # deepmind-research perceiver/train/dataset.py MEAN_RGB, STDDEV_RGB.
  np.testing.assert_allclose(image_ops.MEAN_RGB, (123.675, 116.28, 103.53))
  np.testing.assert_allclose(image_ops.STDDEV_RGB, (58.395, 57.12, 57.375))
  assert image_ops.EVAL_CROP_FRACTION == 224 / 256


def test_normalize():
  image = _photo()
  out = _both(image_ops.normalize, tf.constant(image))
  expected = (image - np.array(image_ops.MEAN_RGB)) / np.array(
      image_ops.STDDEV_RGB)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# RandAugment ops.


def _op(name, image, magnitude=MAGNITUDE, seed=0):
  return _both(
      lambda im, sd: image_ops.RANDAUGMENT_OPS[name](im, magnitude, sd),
      tf.constant(image), _seed(seed))


@pytest.mark.parametrize('name', sorted(image_ops.RANDAUGMENT_OPS))
def test_every_op_at_paper_magnitude(name):
  image = _photo()
  out = _op(name, image)
  assert out.shape == image.shape and out.dtype == np.uint8
  if name == 'identity':
    np.testing.assert_array_equal(out, image)
  else:
    assert not np.array_equal(out, image), name
  np.testing.assert_array_equal(_op(name, image), out)  # Same seed.


@pytest.mark.parametrize('name', [
    'identity', 'rotate', 'posterize', 'solarize', 'solarize_add', 'color',
    'contrast', 'brightness', 'sharpness', 'shear_x', 'shear_y',
    'translate_x', 'translate_y', 'cutout'])
def test_magnitude_zero_is_identity(name):
  image = _photo()
  np.testing.assert_array_equal(_op(name, image, magnitude=0.0), image)


def test_pixel_ops_against_numpy():
  image = _photo()
  np.testing.assert_array_equal(_op('invert', image), 255 - image)
  # Magnitude 5: threshold 128; posterize keeps 6 bits; solarize_add +55.
  np.testing.assert_array_equal(
      _op('solarize', image), np.where(image >= 128, 255 - image, image))
  np.testing.assert_array_equal(_op('posterize', image), image & 0b11111100)
  np.testing.assert_array_equal(
      _op('solarize_add', image),
      np.where(image < 128, np.minimum(image.astype(int) + 55, 255),
               image).astype(np.uint8))
  # Brightness blends with black by 1 +- 0.45.
  out = _op('brightness', image).astype(int)
  candidates = [np.clip(np.round(image * f), 0, 255) for f in (0.55, 1.45)]
  assert any(np.abs(out - c).max() <= 1 for c in candidates)


def test_equalize_and_autocontrast_match_pil():
  image = (_photo() // 2 + 40).astype(np.uint8)  # Narrow the range.
  np.testing.assert_array_equal(
      _op('equalize', image), np.asarray(ImageOps.equalize(
          Image.fromarray(image))))
  pil = np.stack([np.asarray(ImageOps.autocontrast(
      Image.fromarray(image[..., c]))) for c in range(3)], -1)
  np.testing.assert_allclose(_op('autocontrast', image), pil, atol=1)
  flat = np.full([8, 8, 3], 9, np.uint8)  # Degenerate: left unchanged.
  np.testing.assert_array_equal(_op('autocontrast', flat), flat)
  np.testing.assert_array_equal(_op('equalize', flat), flat)


def test_translate_shifts_by_45_percent_of_the_side_times_level():
  image = _photo(36, 40)
  shift = round(0.45 * 0.5 * 40)  # 9 px at magnitude 5.
  out = _op('translate_x', image)
  right = np.full_like(image, image_ops.FILL_VALUE)
  right[:, shift:] = image[:, :-shift]
  left = np.full_like(image, image_ops.FILL_VALUE)
  left[:, :-shift] = image[:, shift:]
  assert np.array_equal(out, right) or np.array_equal(out, left)


def test_rotate_keeps_the_centre_and_fills_corners():
  image = _photo(33, 33)
  out = _op('rotate', image, magnitude=10.0)  # 30 degrees.
  np.testing.assert_array_equal(out[16, 16], image[16, 16])
  np.testing.assert_array_equal(out[0, 0], [image_ops.FILL_VALUE] * 3)
  # 180 degrees is exactly a double flip; check the map's orientation.
  half_turn = image_ops._warp(  # pylint: disable=protected-access
      tf.constant(image), [-1.0, 0.0, 32.0, 0.0, -1.0, 32.0, 0.0, 0.0])
  np.testing.assert_array_equal(half_turn, image[::-1, ::-1])


def test_cutout_greys_one_square():
  image = np.zeros([40, 40, 3], np.uint8)
  out = _op('cutout', image)
  changed = np.argwhere(out[..., 0] != 0)
  side = np.ptp(changed, axis=0) + 1
  assert np.all(side <= 2 * round(0.18 * 0.5 * 40))
  assert np.all(out[out != 0] == image_ops.FILL_VALUE)


def test_randaugment_eager_equals_tf_data_and_is_seeded():
  image = tf.constant(_photo())
  run = lambda sd: image_ops.randaugment(image, sd, num_layers=4,
                                         magnitude=MAGNITUDE)
  seeds = tf.constant([[i, 7] for i in range(6)], tf.int64)
  # One tf.data trace for all seeds (tracing 17 ops is the slow part).
  graph = list(tf.data.Dataset.from_tensor_slices(seeds).map(run)
               .as_numpy_iterator())
  for seed, out in zip(seeds, graph):
    np.testing.assert_array_equal(run(seed).numpy(), out)
    assert out.shape == image.shape and out.dtype == np.uint8
  assert len({o.tobytes() for o in graph}) > 1
  none = image_ops.randaugment(image, _seed(0), num_layers=0, magnitude=5)
  np.testing.assert_array_equal(none, image)


@pytest.mark.parametrize('name', sorted(image_ops.RANDAUGMENT_OPS))
def test_randaugment_runs_every_op_in_tf_data(name):
  image = _photo()
  out = _in_tf_data(
      lambda im, sd: image_ops.randaugment(
          im, sd, num_layers=1, magnitude=MAGNITUDE, apply_prob=1.0,
          ops=(name,)), tf.constant(image), _seed(3))
  assert out.shape == image.shape and out.dtype == np.uint8
  assert np.array_equal(out, image) == (name == 'identity')


def test_randaugment_rejects_bad_arguments():
  image = tf.constant(_photo())
  with pytest.raises(ValueError, match='magnitude=11'):
    image_ops.randaugment(image, _seed(0), num_layers=1, magnitude=11)
  with pytest.raises(ValueError, match='num_layers=-1'):
    image_ops.randaugment(image, _seed(0), num_layers=-1, magnitude=5)
  with pytest.raises(ValueError, match='blur'):
    image_ops.randaugment(image, _seed(0), num_layers=1, magnitude=5,
                          ops=('blur',))
  with pytest.raises(ValueError, match='uint8'):
    image_ops.randaugment(tf.cast(image, tf.float32), _seed(0), num_layers=1,
                          magnitude=5)
