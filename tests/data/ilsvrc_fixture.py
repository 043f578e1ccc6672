"""A tiny ILSVRC-2012 in the exact layout of the real manual download.

Builds, from a few real photographs that ship with scikit-image (astronaut
and rocket: NASA, public domain; coffee and chelsea: CC0), the two tars the
tfds `imagenet2012` builder expects in its manual_dir:

  ILSVRC2012_img_train.tar   one inner tar per class, n########.tar, holding
                             n########_N.JPEG
  ILSVRC2012_img_val.tar     flat ILSVRC2012_val_%08d.JPEG

The builder labels validation images by zipping the SORTED member names of
the val tar with the lines of its bundled validation_labels.txt (one synset
per image, in file-number order). The fixture therefore names its validation
images ILSVRC2012_val_00000001 ... _%08d(num_val), so that file k gets line k,
exactly as in the real tar, and trains on those same synsets.

Then `prepare` runs the REAL builder offline (download_and_prepare with a
manual_dir) into a data_dir. Tests reuse it through the `imagenet_fixture`
pytest fixture (import it into a test module) or `prepare(root)` directly;
both build once per directory.
"""

import dataclasses
import io
import os
import tarfile

import numpy as np
from PIL import Image
import pytest

# Synsets of ILSVRC2012_val_00000001..10 in tfds' validation_labels.txt.
NUM_VAL = 10
TRAIN_PER_CLASS = 3
PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket')
TRAIN_TAR = 'ILSVRC2012_img_train.tar'
VAL_TAR = 'ILSVRC2012_img_val.tar'


@dataclasses.dataclass(frozen=True)
class Fixture:
  """What was written and built.

  Attributes:
    manual_dir: holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar.
    data_dir: tfds data dir with imagenet2012 prepared (None until built).
    synsets: the classes used, sorted, e.g. ('n01735189', ...).
    train_labels: label index (in tfds' 1000-class order) of every training
      image, sorted.
    val_labels: label index of ILSVRC2012_val_00000001.. in file order.
  """
  manual_dir: str
  data_dir: str | None
  synsets: tuple[str, ...]
  train_labels: tuple[int, ...]
  val_labels: tuple[int, ...]

  @property
  def num_train(self) -> int:
    return len(self.train_labels)

  @property
  def num_val(self) -> int:
    return len(self.val_labels)


def label_names() -> list[str]:
  """tfds' 1000 ImageNet synsets; the line number is the label index."""
  return _tfds_lines('labels.txt')


def validation_synsets() -> list[str]:
  """Synset of ILSVRC2012_val_%08d(k + 1) at index k (50,000 lines)."""
  return _tfds_lines('validation_labels.txt')


def _tfds_lines(name: str) -> list[str]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = tfds.core.tfds_path(f'datasets/imagenet2012/{name}')
  with open(os.fspath(path)) as f:
    return f.read().strip().splitlines()


def _photos() -> list[np.ndarray]:
  from skimage import data  # pylint: disable=g-import-not-at-top
  return [np.asarray(getattr(data, name)())[..., :3] for name in PHOTOS]


def _jpeg(photo: np.ndarray, rng: np.random.Generator, *,
          image_px: tuple[int, int], gray: bool = False) -> bytes:
  """A random crop of `photo` [H, W, 3], long side in image_px, as JPEG."""
  h, w, _ = photo.shape
  ch = int(rng.integers(h // 2, h + 1))
  cw = int(rng.integers(w // 2, w + 1))
  y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
  crop = photo[y:y + ch, x:x + cw]
  if rng.random() < 0.5:
    crop = crop[:, ::-1]
  # Long side in image_px, short side at least half of its minimum.
  scale = float(rng.integers(image_px[0], image_px[1] + 1)) / max(ch, cw)
  floor = max(1, image_px[0] // 2)
  size = (max(floor, round(cw * scale)), max(floor, round(ch * scale)))
  image = Image.fromarray(np.ascontiguousarray(crop)).resize(
      size, Image.BICUBIC)
  if gray:  # ImageNet holds some grayscale JPEGs; decoders must cope.
    image = image.convert('L')
  out = io.BytesIO()
  image.save(out, format='JPEG', quality=90)
  return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  info.mtime = 0
  tar.addfile(info, io.BytesIO(payload))


def write_tars(manual_dir: str, *, num_val: int = NUM_VAL,
               train_per_class: int = TRAIN_PER_CLASS,
               image_px: tuple[int, int] = (64, 96),
               seed: int = 0) -> Fixture:
  """Writes the two ILSVRC-2012 tars into `manual_dir` (created if needed).

  Args:
    manual_dir: output directory.
    num_val: validation images ILSVRC2012_val_00000001..num_val; their
      synsets (from tfds' validation_labels.txt) are the training classes.
    train_per_class: training images per class.
    image_px: (min, max) long side of the images in pixels; small keeps the
      build fast (real ImageNet photos average about 400 x 350).
    seed: seeds the crops, so the bytes are reproducible.

  Returns:
    The Fixture (data_dir None: nothing built yet).
  """
  if (not 1 <= num_val <= 50_000 or train_per_class < 1 or
      not 2 <= image_px[0] <= image_px[1]):
    raise ValueError(
        f'num_val={num_val} must be in [1, 50000], train_per_class='
        f'{train_per_class} positive and image_px={image_px} ordered, >= 2.')
  os.makedirs(manual_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  photos = _photos()
  names = label_names()
  val_synsets = validation_synsets()[:num_val]
  synsets = sorted(set(val_synsets))

  with tarfile.open(os.path.join(manual_dir, TRAIN_TAR), 'w') as outer:
    for c, synset in enumerate(synsets):
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode='w') as inner:
        for n in range(train_per_class):
          photo = photos[(c + n) % len(photos)]
          _add(inner, f'{synset}_{n + 1}.JPEG',
               _jpeg(photo, rng, image_px=image_px,
                     gray=(c, n) == (0, 0)))
      _add(outer, f'{synset}.tar', inner_bytes.getvalue())

  with tarfile.open(os.path.join(manual_dir, VAL_TAR), 'w') as val:
    # Written out of order on purpose: the builder must sort the names.
    for k in reversed(range(num_val)):
      photo = photos[synsets.index(val_synsets[k]) % len(photos)]
      _add(val, f'ILSVRC2012_val_{k + 1:08d}.JPEG',
           _jpeg(photo, rng, image_px=image_px, gray=k == 1))

  train_labels = sorted(names.index(s) for s in synsets
                        for _ in range(train_per_class))
  return Fixture(manual_dir=manual_dir, data_dir=None,
                 synsets=tuple(synsets), train_labels=tuple(train_labels),
                 val_labels=tuple(names.index(s) for s in val_synsets))


def prepare(root: str, **kwargs) -> Fixture:
  """Writes the tars under root/manual and builds root/tfds with tfds.

  Runs the real `imagenet2012` builder (download_and_prepare with
  DownloadConfig(manual_dir=...)), fully offline. Idempotent: an existing
  build under `root` is reused.

  Args:
    root: a scratch directory.
    **kwargs: forwarded to `write_tars`.

  Returns:
    The Fixture, with data_dir set.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  manual_dir = os.path.join(root, 'manual')
  data_dir = os.path.join(root, 'tfds')
  fixture = write_tars(manual_dir, **kwargs)
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return dataclasses.replace(fixture, data_dir=data_dir)


@pytest.fixture(scope='session')
def imagenet_fixture(tmp_path_factory) -> Fixture:
  """Session fixture: the tiny ImageNet, built once by the real builder.

  Importing this fixture into several test modules still builds once: every
  copy prepares the same directory under the session's base temp dir.
  """
  root = tmp_path_factory.getbasetemp() / 'ilsvrc2012_fixture'
  return prepare(str(root))
