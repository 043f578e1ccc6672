"""Image augmentations as pure TensorFlow functions (eager or in tf.data).

Every random op is stateless: it takes `seed`, an int32/int64 tensor [2], and
returns the same output for the same seed, so a pipeline seeded per example is
reproducible whatever the order in which tf.data runs it. Shapes: H, W, C =
height, width, channels (3, RGB); B = batch; K = classes.

Contents:
  - Inception-style random crop (P1/P2 ImageNet training), fused with JPEG
    decoding; the 224/256 centre crop used for evaluation.
  - Random horizontal flip, bicubic resize, mean/std normalisation.
  - Decoding any image file (JPEG fused with its crop; PNG, GIF, BMP).
  - RandAugment (Cubuk et al. 2020) on uint8 images, written on plain TF ops
    (affine warps via ImageProjectiveTransformV3): no tensorflow-addons.
  - MixUp and CutMix on groups of examples, producing soft labels (P2
    ImageNet), as DeepMind's released training code (see `mix_group`).

RandAugment magnitude convention: `magnitude` in [0, 10]; 0 is the identity
for every op and 10 its strongest setting (rotate 30 degrees, shear 0.3,
translate 45% of the side, enhance factors 1 +- 0.9, posterize to 4 bits,
solarize every value, solarize-add +110, cutout a square of 36% of the short
side). Deviation: the TF reference implementation used by the released
Perceiver code maps the enhance ops (color, contrast, brightness, sharpness)
to factors 0.1 + 1.8 * magnitude / 10, which makes them no-ops at the paper's
magnitude 5, and scales translate/cutout in pixels of a 224 image; here
factors get a random sign around 1 and geometric sizes are relative to the
image, so small test images behave like 224 ones.
"""

from typing import Callable, Sequence

import tensorflow as tf

# ImageNet RGB statistics on the [0, 255] scale.
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# Evaluation centre crop: 224 of 256 of the short side ("crop_padding 32").
EVAL_CROP_FRACTION = 224 / 256

MAX_MAGNITUDE = 10.0
# Grey used for pixels that affine warps and cutout leave empty.
FILL_VALUE = 128

Seed = tf.Tensor  # int32 or int64 [2], as for tf.random.stateless_*.


def split_seed(seed: Seed, num: int) -> list[tf.Tensor]:
  """Derives `num` independent seeds [2] from one seed [2]."""
  seeds = tf.random.experimental.stateless_split(
      tf.convert_to_tensor(seed), num)
  return [seeds[i] for i in range(num)]


def _uniform(seed: Seed, minval: float = 0.0, maxval: float = 1.0
             ) -> tf.Tensor:
  return tf.random.stateless_uniform([], seed, minval, maxval, tf.float32)


# Crops.


def inception_crop_window(
    image_shape: tf.Tensor, seed: Seed, *,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
    max_attempts: int = 10,
    fallback_crop_fraction: float = EVAL_CROP_FRACTION) -> tf.Tensor:
  """Samples an Inception-style crop window (Szegedy et al. 2015).

  The crop covers `area_range` of the image area with width/height in
  `aspect_ratio_range`. When no such window is found in `max_attempts`
  tries, it falls back to the centre crop, as in the reference ImageNet code.

  Args:
    image_shape: int [3] (H, W, C) of the full image.
    seed: [2].
    area_range: fraction of the image area to keep, (min, max).
    aspect_ratio_range: crop width / height, (min, max).
    max_attempts: rejection-sampling attempts.
    fallback_crop_fraction: centre crop used when sampling fails.

  Returns:
    int32 [4]: (offset_y, offset_x, crop_height, crop_width).
  """
  image_shape = tf.cast(image_shape, tf.int32)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape,
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
      seed=seed, min_object_covered=0.1,
      aspect_ratio_range=aspect_ratio_range, area_range=area_range,
      max_attempts=max_attempts, use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  # The sampler returns the whole image when every attempt failed.
  failed = tf.reduce_all(tf.equal(size[:2], image_shape[:2]))
  return tf.cond(
      failed,
      lambda: center_crop_window(image_shape, fallback_crop_fraction),
      lambda: window)


def center_crop_window(image_shape: tf.Tensor,
                       crop_fraction: float = EVAL_CROP_FRACTION
                       ) -> tf.Tensor:
  """The centred square of side crop_fraction * min(H, W).

  With crop_fraction = 224 / 256 this is the reference code's centre crop
  with crop_padding 32 at image size 224.

  Args:
    image_shape: int [3] (H, W, C).
    crop_fraction: in (0, 1].

  Returns:
    int32 [4]: (offset_y, offset_x, side, side).
  """
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f'crop_fraction={crop_fraction} must be in (0, 1].')
  image_shape = tf.cast(image_shape, tf.int32)
  height, width = image_shape[0], image_shape[1]
  side = tf.cast(
      crop_fraction * tf.cast(tf.minimum(height, width), tf.float32),
      tf.int32)
  side = tf.maximum(side, 1)
  return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side,
                   side])


def decode_and_random_crop(image_bytes: tf.Tensor, seed: Seed,
                           **kwargs) -> tf.Tensor:
  """Decodes only an Inception-style crop of a JPEG (fused, fast).

  Args:
    image_bytes: scalar string, a JPEG (grey or RGB).
    seed: [2].
    **kwargs: forwarded to `inception_crop_window`.

  Returns:
    uint8 [h, w, 3], the crop.
  """
  shape = tf.image.extract_jpeg_shape(image_bytes)
  window = inception_crop_window(shape, seed, **kwargs)
  return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)


def decode_and_center_crop(image_bytes: tf.Tensor,
                           crop_fraction: float = EVAL_CROP_FRACTION
                           ) -> tf.Tensor:
  """Decodes the centre crop (`center_crop_window`) of an image file.

  A JPEG decodes only the crop (fused, fast; the released evaluation's
  decoder). PNG, GIF (first frame) and BMP decode whole, then are cropped.
  Grey and RGBA images become RGB.

  Args:
    image_bytes: scalar string, the file's contents.
    crop_fraction: in (0, 1].

  Returns:
    uint8 [s, s, 3], s = int(crop_fraction * min(H, W)).
  """
  image_bytes = tf.convert_to_tensor(image_bytes, tf.string)

  def jpeg():
    shape = tf.image.extract_jpeg_shape(image_bytes)
    window = center_crop_window(shape, crop_fraction)
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

  def other():
    image = tf.io.decode_image(image_bytes, channels=3,
                               expand_animations=False)
    return center_crop(image, crop_fraction)

  return tf.ensure_shape(tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other),
                         [None, None, 3])


def crop(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  """Crops a decoded image [H, W, C] to window (y, x, h, w): [h, w, C]."""
  return tf.slice(image, tf.stack([window[0], window[1], 0]),
                  tf.stack([window[2], window[3], -1]))


def random_crop(image: tf.Tensor, seed: Seed, **kwargs) -> tf.Tensor:
  """`decode_and_random_crop` for an already decoded image [H, W, C]."""
  return crop(image, inception_crop_window(tf.shape(image), seed, **kwargs))


def center_crop(image: tf.Tensor,
                crop_fraction: float = EVAL_CROP_FRACTION) -> tf.Tensor:
  """`decode_and_center_crop` for an already decoded image [H, W, C]."""
  return crop(image, center_crop_window(tf.shape(image), crop_fraction))


# Resizing, flipping, normalising.


def resize(image: tf.Tensor, size: int | Sequence[int], *,
           clip: bool = True) -> tf.Tensor:
  """Bicubic resize to [size, size] (or [h, w]), float32.

  The kernel is `tf.image.resize`'s bicubic (Keys cubic, a = -0.5, half-pixel
  centres, no antialiasing; taps outside the image get weight 0 and the rest
  are renormalised), as in the released Perceiver code.

  Args:
    image: [H, W, C] or [B, H, W, C], any real or integer dtype on the
      [0, 255] scale.
    size: output side, or (height, width).
    clip: clip to [0, 255]. Bicubic overshoots next to sharp edges; training
      clips, evaluation keeps the overshoot as the released evaluation does.

  Returns:
    float32 [size, size, C] (or batched).
  """
  size = (size, size) if isinstance(size, int) else tuple(size)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f'size={size} must be a positive int or (h, w).')
  image = tf.image.resize(tf.cast(image, tf.float32), size, method='bicubic')
  return tf.clip_by_value(image, 0.0, 255.0) if clip else image


def random_flip(image: tf.Tensor, seed: Seed) -> tf.Tensor:
  """Mirrors [H, W, C] left-right with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def normalize(image: tf.Tensor, mean: Sequence[float] = MEAN_RGB,
              std: Sequence[float] = STDDEV_RGB) -> tf.Tensor:
  """(image - mean) / std per channel; float32 [..., C]."""
  image = tf.cast(image, tf.float32)
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std,
                                                               tf.float32)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Rounds and clips a [0, 255]-scaled image to uint8."""
  return tf.cast(tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0.0,
                                  255.0), tf.uint8)


# RandAugment ops: (uint8 [H, W, 3], magnitude in [0, 10], seed) -> uint8.


def _level(magnitude) -> tf.Tensor:
  return tf.cast(magnitude, tf.float32) / MAX_MAGNITUDE


def _random_sign(value: tf.Tensor, seed: Seed) -> tf.Tensor:
  return tf.where(_uniform(seed) < 0.5, -value, value)


def _blend(degenerate: tf.Tensor, image: tf.Tensor,
           factor: tf.Tensor) -> tf.Tensor:
  """degenerate + factor * (image - degenerate), as PIL's ImageEnhance."""
  degenerate = tf.cast(degenerate, tf.float32)
  image = tf.cast(image, tf.float32)
  return to_uint8(degenerate + factor * (image - degenerate))


def _enhance_factor(magnitude, seed: Seed) -> tf.Tensor:
  return 1.0 + _random_sign(0.9 * _level(magnitude), seed)


def _warp(image: tf.Tensor, transform: Sequence[tf.Tensor]) -> tf.Tensor:
  """Applies a projective map [8] (output -> input coordinates)."""
  transform = tf.reshape(tf.cast(tf.stack(transform), tf.float32), [1, 8])
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform,
      output_shape=tf.shape(image)[:2], fill_value=float(FILL_VALUE),
      interpolation='NEAREST', fill_mode='CONSTANT')
  return out[0]


def identity(image: tf.Tensor, magnitude, seed: Seed) -> tf.Tensor:
  del magnitude, seed
  return tf.identity(image)


def autocontrast(image: tf.Tensor, magnitude, seed: Seed) -> tf.Tensor:
  """Stretches each channel to [0, 255]; flat channels are unchanged."""
  del magnitude, seed
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  offset = tf.where(hi > lo, lo, 0.0)
  return to_uint8((x - offset) * scale)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  """PIL's ImageOps.equalize on one uint8 channel [H, W]."""
  values = tf.cast(channel, tf.int32)
  histogram = tf.math.bincount(values, minlength=256, maxlength=256)
  nonzero = tf.boolean_mask(histogram, histogram > 0)
  step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

  def equalized():
    safe_step = tf.maximum(step, 1)
    lut = (tf.cumsum(histogram) + safe_step // 2) // safe_step
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    return tf.cast(tf.gather(lut, values), tf.uint8)

  return tf.cond(step == 0, lambda: channel, equalized)


def equalize(image: tf.Tensor, magnitude, seed: Seed) -> tf.Tensor:
  """Histogram-equalises each channel (as PIL)."""
  del magnitude, seed
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], -1)


def invert(image: tf.Tensor, magnitude, seed: Seed) -> tf.Tensor:
  del magnitude, seed
  return 255 - image


def rotate(image: tf.Tensor, magnitude, seed: Seed) -> tf.Tensor:
  """Rotates about the centre by +-30 * magnitude / 10 degrees."""
  degrees = _random_sign(30.0 * _level(magnitude), seed)
  radians = degrees * (3.141592653589793 / 180.0)
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  cy, cx = (height - 1.0) / 2.0, (width - 1.0) / 2.0
  cos, sin = tf.cos(radians), tf.sin(radians)
  # input = R (output - centre) + centre.
  return _warp(image, [cos, -sin, cx - cos * cx + sin * cy,
                       sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])


def shear_x(image: tf.Tensor, magnitude, seed: Seed) -> tf.Tensor:
  """Shears x by +-0.3 * magnitude / 10 of y."""
  shear = _random_sign(0.3 * _level(magnitude), seed)
  return _warp(image, [1.0, shear, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image: tf.Tensor, magnitude, seed: Seed) -> tf.Tensor:
  """Shears y by +-0.3 * magnitude / 10 of x."""
  shear = _random_sign(0.3 * _level(magnitude), seed)
  return _warp(image, [1.0, 0.0, 0.0, shear, 1.0, 0.0, 0.0, 0.0])


def translate_x(image: tf.Tensor, magnitude, seed: Seed) -> tf.Tensor:
  """Shifts by +-0.45 * magnitude / 10 of the width (100 px of 224)."""
  width = tf.cast(tf.shape(image)[1], tf.float32)
  pixels = tf.round(_random_sign(0.45 * _level(magnitude) * width, seed))
  return _warp(image, [1.0, 0.0, -pixels, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image: tf.Tensor, magnitude, seed: Seed) -> tf.Tensor:
  """Shifts by +-0.45 * magnitude / 10 of the height."""
  height = tf.cast(tf.shape(image)[0], tf.float32)
  pixels = tf.round(_random_sign(0.45 * _level(magnitude) * height, seed))
  return _warp(image, [1.0, 0.0, 0.0, 0.0, 1.0, -pixels, 0.0, 0.0])


def solarize(image: tf.Tensor, magnitude, seed: Seed) -> tf.Tensor:
  """Inverts values >= 256 * (1 - magnitude / 10)."""
  del seed
  threshold = 256.0 * (1.0 - _level(magnitude))
  return tf.where(tf.cast(image, tf.float32) >= threshold, 255 - image, image)


def solarize_add(image: tf.Tensor, magnitude, seed: Seed) -> tf.Tensor:
  """Adds 110 * magnitude / 10 to values below 128."""
  del seed
  x = tf.cast(image, tf.float32)
  added = to_uint8(x + tf.round(110.0 * _level(magnitude)))
  return tf.where(x < 128.0, added, image)


def posterize(image: tf.Tensor, magnitude, seed: Seed) -> tf.Tensor:
  """Keeps the top 8 - int(4 * magnitude / 10) bits of each value."""
  del seed
  shift = tf.cast(4.0 * _level(magnitude), tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def color(image: tf.Tensor, magnitude, seed: Seed) -> tf.Tensor:
  """Saturation: blends with the grey image by 1 +- 0.9 * magnitude / 10."""
  grey = tf.image.grayscale_to_rgb(
      tf.image.rgb_to_grayscale(tf.cast(image, tf.float32)))
  return _blend(tf.round(grey), image, _enhance_factor(magnitude, seed))


def contrast(image: tf.Tensor, magnitude, seed: Seed) -> tf.Tensor:
  """Blends with the mean grey level by 1 +- 0.9 * magnitude / 10."""
  grey = tf.round(tf.image.rgb_to_grayscale(tf.cast(image, tf.float32)))
  mean = tf.reduce_mean(grey)
  return _blend(tf.fill(tf.shape(image), mean), image,
                _enhance_factor(magnitude, seed))


def brightness(image: tf.Tensor, magnitude, seed: Seed) -> tf.Tensor:
  """Blends with black by 1 +- 0.9 * magnitude / 10."""
  return _blend(tf.zeros_like(image), image, _enhance_factor(magnitude, seed))


def sharpness(image: tf.Tensor, magnitude, seed: Seed) -> tf.Tensor:
  """Blends with a smoothed image (PIL's SMOOTH kernel; border kept)."""
  x = tf.cast(image, tf.float32)[None]  # [1, H, W, 3]
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], 'VALID')[0]
  inner = tf.ones_like(smooth, tf.bool)
  inner = tf.pad(inner, [[1, 1], [1, 1], [0, 0]], constant_values=False)
  smooth = tf.pad(tf.round(smooth), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(inner, smooth, x[0])
  return _blend(degenerate, image, _enhance_factor(magnitude, seed))


def cutout(image: tf.Tensor, magnitude, seed: Seed) -> tf.Tensor:
  """Greys a square of side 0.36 * magnitude / 10 of the short side."""
  seed_y, seed_x = split_seed(seed, 2)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  half = tf.cast(tf.round(
      0.18 * _level(magnitude) * tf.cast(tf.minimum(height, width),
                                         tf.float32)), tf.int32)
  cy = tf.random.stateless_uniform([], seed_y, 0, height, tf.int32)
  cx = tf.random.stateless_uniform([], seed_x, 0, width, tf.int32)
  rows = tf.range(height)[:, None, None]
  cols = tf.range(width)[None, :, None]
  inside = ((rows >= cy - half) & (rows < cy + half) &
            (cols >= cx - half) & (cols < cx + half))
  return tf.where(inside, tf.constant(FILL_VALUE, image.dtype), image)


RandAugmentOp = Callable[[tf.Tensor, float, Seed], tf.Tensor]

# Every op RandAugment can pick: those of the RandAugment paper plus invert,
# cutout and solarize_add of the TF reference implementation.
RANDAUGMENT_OPS: dict[str, RandAugmentOp] = {
    'identity': identity,
    'autocontrast': autocontrast,
    'equalize': equalize,
    'invert': invert,
    'rotate': rotate,
    'posterize': posterize,
    'solarize': solarize,
    'solarize_add': solarize_add,
    'color': color,
    'contrast': contrast,
    'brightness': brightness,
    'sharpness': sharpness,
    'shear_x': shear_x,
    'shear_y': shear_y,
    'translate_x': translate_x,
    'translate_y': translate_y,
    'cutout': cutout,
}


def randaugment(image: tf.Tensor, seed: Seed, *, num_layers: int,
                magnitude: float, apply_prob: float = 0.5,
                ops: Sequence[str] = tuple(RANDAUGMENT_OPS)) -> tf.Tensor:
  """RandAugment: `num_layers` ops drawn uniformly, each at `magnitude`.

  P2 trains ImageNet with num_layers 4, magnitude 5. Each drawn op is applied
  with probability `apply_prob` (the reference implementation's average).

  Args:
    image: uint8 [H, W, 3].
    seed: [2].
    num_layers: ops applied in sequence; 0 returns the image unchanged.
    magnitude: strength in [0, 10] (see the module docstring).
    apply_prob: probability of applying each drawn op.
    ops: names from RANDAUGMENT_OPS to draw from.

  Returns:
    uint8 [H, W, 3].

  Raises:
    ValueError: bad num_layers, magnitude, apply_prob, ops, or dtype.
  """
  if num_layers < 0:
    raise ValueError(f'num_layers={num_layers} must be >= 0.')
  if not 0.0 <= magnitude <= MAX_MAGNITUDE:
    raise ValueError(f'magnitude={magnitude} must be in [0, 10].')
  if not 0.0 <= apply_prob <= 1.0:
    raise ValueError(f'apply_prob={apply_prob} must be in [0, 1].')
  unknown = sorted(set(ops) - set(RANDAUGMENT_OPS))
  if unknown or not ops:
    raise ValueError(f'Unknown or no RandAugment ops {unknown or ops}; '
                     f'expected names from {sorted(RANDAUGMENT_OPS)}.')
  if image.dtype != tf.uint8:
    raise ValueError(f'randaugment needs a uint8 image, got {image.dtype}.')
  shape = image.shape

  def layer(i, image):
    layer_seed = tf.random.experimental.stateless_fold_in(seed, i)
    choice_seed, prob_seed, op_seed = split_seed(layer_seed, 3)
    index = tf.random.stateless_uniform([], choice_seed, 0, len(ops),
                                        tf.int32)
    branches = [
        (lambda fn=RANDAUGMENT_OPS[name]: fn(image, magnitude, op_seed))
        for name in ops]
    image = tf.cond(_uniform(prob_seed) < apply_prob,
                    lambda: tf.switch_case(index, branches), lambda: image)
    return i + 1, tf.ensure_shape(image, shape)

  # A loop, not a Python unroll: tf.data traces the ops once, not per layer.
  _, image = tf.while_loop(lambda i, _: i < num_layers, layer,
                           (tf.constant(0), image))
  return image


# Batch-level mixing (P2): soft labels, as DeepMind's released training code.
#
# deepmind-research perceiver/train/dataset.py (`load`, `cutmix_padding`,
# `my_mixup`, `my_cutmix`, `my_mixup_cutmix`; from nfnets/dataset.py) and
# perceiver/train/experiment.py (`_loss_fn`). There, a group of 2n examples
# (n = the per-device batch) gives n mixed ones, each mixed with a DIFFERENT
# example of the group, never itself:
#   MixUp and CutMix: the first n/2 outputs are MixUp of examples [0, n/2)
#     with [n/2, n); the last n/2 are CutMix of [n, 3n/2) with [3n/2, 2n).
#   MixUp only / CutMix only: all n outputs, examples [0, n) with [n, 2n).
# Every output draws its own ratio. MixUp: lam ~ Beta(mixup_alpha,
# mixup_alpha), image lam * x + (1 - lam) * x_partner. CutMix: a box of
# sides floor(sqrt(1 - p) * side) with p ~ Uniform(0, 1) (Beta(1, 1); here
# Beta(cutmix_alpha, cutmix_alpha), so cutmix_alpha=1.0 is the released
# recipe) around a uniform integer centre, each half side rounded down and
# clipped to the image; the example keeps its own pixels INSIDE the box and
# takes the partner's outside, and its ratio is the box's area fraction (the
# area actually kept, after clipping). Labels: ratio * onehot(label) +
# (1 - ratio) * onehot(partner label); label smoothing comes after mixing,
# on the mixed labels (`losses` does so for 'label_probs').


def _beta(seed: Seed, alpha: float, shape: Sequence[int] = ()) -> tf.Tensor:
  """Samples of Beta(alpha, alpha) [*shape] via two Gamma(alpha) draws."""
  seed_a, seed_b = split_seed(seed, 2)
  a = tf.random.stateless_gamma(shape, seed_a, alpha)
  b = tf.random.stateless_gamma(shape, seed_b, alpha)
  return a / tf.maximum(a + b, 1e-30)


def cutmix_masks(num: int, height: int, width: int, seed: Seed, *,
                 alpha: float = 1.0) -> tuple[tf.Tensor, tf.Tensor]:
  """`num` CutMix boxes as the released `cutmix_padding` draws them.

  Args:
    num: boxes to draw.
    height, width: image size H, W.
    seed: [2].
    alpha: p ~ Beta(alpha, alpha) sets the box side ratio sqrt(1 - p);
      1.0 (uniform) as released.

  Returns:
    (masks float32 [num, H, W, 1], 1 inside the box (the example's own
    pixels) and 0 outside (the partner's); ratios float32 [num], each
    mask's mean: the example's share of its mixed label).
  """
  if alpha <= 0:
    raise ValueError(f'cutmix alpha={alpha} must be positive.')
  p_seed, y_seed, x_seed = split_seed(seed, 3)
  proportion = _beta(p_seed, alpha, [num])
  side = tf.sqrt(1.0 - proportion)
  # Truncation towards zero, as tf.cast(float -> int32) in the released code.
  half_h = tf.cast(side * float(height), tf.int32) // 2  # [num]
  half_w = tf.cast(side * float(width), tf.int32) // 2
  cy = tf.random.stateless_uniform([num], y_seed, 0, height, tf.int32)
  cx = tf.random.stateless_uniform([num], x_seed, 0, width, tf.int32)
  y0 = tf.clip_by_value(cy - half_h, 0, height)[:, None, None]  # [num, 1, 1]
  y1 = tf.clip_by_value(cy + half_h, 0, height)[:, None, None]
  x0 = tf.clip_by_value(cx - half_w, 0, width)[:, None, None]
  x1 = tf.clip_by_value(cx + half_w, 0, width)[:, None, None]
  rows = tf.range(height)[None, :, None]  # [1, H, 1]
  cols = tf.range(width)[None, None, :]  # [1, 1, W]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # [num, H, W]
  masks = tf.cast(box, tf.float32)[..., None]
  return masks, tf.reduce_mean(masks, axis=[1, 2, 3])


def mix_split(batch_size: int, *, mixup: bool, cutmix: bool
              ) -> tuple[int, int]:
  """(MixUp outputs, CutMix outputs) of a group making batch_size outputs.

  Both on: floor(n/2) MixUp and the rest CutMix (the released code's half
  and half; for odd n it would drop one example, here CutMix gets it).
  """
  if not (mixup or cutmix):
    raise ValueError('mix_split needs mixup or cutmix on.')
  if batch_size < 1:
    raise ValueError(f'batch_size={batch_size} must be >= 1.')
  if mixup and cutmix:
    return batch_size // 2, batch_size - batch_size // 2
  return (batch_size, 0) if mixup else (0, batch_size)


def mix_group(images: tf.Tensor, labels: tf.Tensor, seed: Seed, *,
              mixup_alpha: float, cutmix_alpha: float) -> dict[str, tf.Tensor]:
  """MixUp and/or CutMix of a group of 2n examples into n (released recipe).

  See the section comment above for which example gets which, and the
  partners. mixup_alpha / cutmix_alpha > 0 turn each on.

  Args:
    images: float [2n, H, W, C], with a static first dimension.
    labels: int32 [2n].
    seed: [2].
    mixup_alpha: MixUp's Beta concentration (P2: 0.2); 0 turns it off.
    cutmix_alpha: CutMix's box-proportion Beta concentration (P2: 1.0, the
      released uniform); 0 turns it off.

  Returns:
    {'inputs': [n, H, W, C], 'label': [n] (each output's own example),
     'mix_label': [n] (its partner's), 'ratio': float32 [n] (the own
     example's share: MixUp's lam, CutMix's kept area),
     'is_cutmix': bool [n]}.
  """
  for name, alpha in (('mixup_alpha', mixup_alpha),
                      ('cutmix_alpha', cutmix_alpha)):
    if alpha < 0:
      raise ValueError(f'{name}={alpha} must be >= 0.')
  if images.shape.rank != 4 or labels.shape.rank != 1:
    raise ValueError(f'Expected images [2n, H, W, C] and labels [2n], got '
                     f'{images.shape} and {labels.shape}.')
  group = images.shape[0]
  if group is None or group % 2 or group != labels.shape[0]:
    raise ValueError(
        f'Expected a static, even group size 2n shared by images and '
        f'labels, got {images.shape[0]} and {labels.shape[0]}.')
  num_mixup, num_cutmix = mix_split(group // 2, mixup=mixup_alpha > 0,
                                    cutmix=cutmix_alpha > 0)
  mixup_seed, cutmix_seed = split_seed(seed, 2)
  height, width = images.shape[1], images.shape[2]
  if height is None or width is None:
    height, width = tf.shape(images)[1], tf.shape(images)[2]
  out = {'inputs': [], 'label': [], 'mix_label': [], 'ratio': [],
         'is_cutmix': []}

  def add(own, partner, ratio, mixed, is_cutmix):
    out['inputs'].append(mixed)
    out['label'].append(tf.gather(labels, own))
    out['mix_label'].append(tf.gather(labels, partner))
    out['ratio'].append(ratio)
    out['is_cutmix'].append(tf.fill([len(own)], is_cutmix))

  if num_mixup:
    own = list(range(num_mixup))
    partner = list(range(num_mixup, 2 * num_mixup))
    lam = _beta(mixup_seed, mixup_alpha, [num_mixup])
    x, y = tf.gather(images, own), tf.gather(images, partner)
    blend = tf.cast(lam, x.dtype)[:, None, None, None]
    add(own, partner, lam, blend * x + (1.0 - blend) * y, False)
  if num_cutmix:
    start = 2 * num_mixup
    own = list(range(start, start + num_cutmix))
    partner = list(range(start + num_cutmix, start + 2 * num_cutmix))
    masks, ratio = cutmix_masks(num_cutmix, height, width, cutmix_seed,
                                alpha=cutmix_alpha)
    x, y = tf.gather(images, own), tf.gather(images, partner)
    add(own, partner, ratio, tf.where(masks > 0, x, y), True)
  return {k: tf.concat(v, axis=0) for k, v in out.items()}


def mixed_label_probs(label: tf.Tensor, mix_label: tf.Tensor,
                      ratio: tf.Tensor, num_classes: int) -> tf.Tensor:
  """ratio * onehot(label) + (1 - ratio) * onehot(mix_label): [n, K].

  As the released `_loss_fn`, before any label smoothing.
  """
  own = tf.one_hot(label, num_classes, dtype=tf.float32)
  other = tf.one_hot(mix_label, num_classes, dtype=tf.float32)
  ratio = tf.cast(ratio, tf.float32)[:, None]
  return ratio * own + (1.0 - ratio) * other
