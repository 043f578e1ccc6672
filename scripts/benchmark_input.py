r"""Measures the ImageNet training input pipeline in images/sec (one JSON line).

  python scripts/benchmark_input.py                      # on a built fixture
  python scripts/benchmark_input.py --data_dir=/path/to/tfds --batch_size=1024

Without --data_dir it builds, in a temporary directory, a small ILSVRC-2012
in the real layout (tests/data/ilsvrc_fixture.py) with ImageNet-sized photos
(long side 300-500 px; real ones average about 400 x 350) and prepares it
with the real tfds builder; the pipeline repeats it. Times `load(...,
is_training=True)` exactly as training runs it (fused decode + Inception
crop, bicubic resize, flip, RandAugment 4/5, normalisation, optional
MixUp/CutMix, NumPy batches) after --warmup_batches, on this machine's CPUs.

Fields: images_per_sec, batch_size, image_size, num_batches, seconds,
randaugment_layers, mixup, data ('fixture' or the data_dir), cpu_count.
"""

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags

from perceiver_jax.data import imagenet

_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'Prepared tfds data dir; default: build a fixture.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 128, 'Images per batch.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Crop side.')
_NUM_BATCHES = flags.DEFINE_integer('num_batches', 20, 'Batches timed.')
_WARMUP = flags.DEFINE_integer('warmup_batches', 3, 'Batches not timed.')
_RANDAUGMENT = flags.DEFINE_integer('randaugment_layers', 4,
                                    'RandAugment layers (0: off).')
_MIX = flags.DEFINE_bool('mix', False, 'MixUp 0.2 + CutMix 1.0 (P2).')
_FIXTURE_PER_CLASS = flags.DEFINE_integer(
    'fixture_per_class', 20, 'Fixture training images per class (10 classes).')


def _build_fixture(root: str) -> str:
  """Prepares the test fixture with ImageNet-sized images; its data_dir."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, repo)
  from tests.data import ilsvrc_fixture  # pylint: disable=g-import-not-at-top
  fixture = ilsvrc_fixture.prepare(
      root, train_per_class=_FIXTURE_PER_CLASS.value, image_px=(300, 500))
  return fixture.data_dir


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = _DATA_DIR.value or _build_fixture(tmp)
    config = imagenet.default_config()
    config.data_dir = data_dir
    config.image_size = _IMAGE_SIZE.value
    config.randaugment_layers = _RANDAUGMENT.value
    if _MIX.value:
      config.mixup_alpha, config.cutmix_alpha = 0.2, 1.0
    batches = imagenet.load(config, 'train', is_training=True,
                            batch_dims=(1, _BATCH_SIZE.value), seed=0)
    for _ in range(_WARMUP.value):
      next(batches)
    start = time.perf_counter()
    for _ in range(_NUM_BATCHES.value):
      next(batches)
    seconds = time.perf_counter() - start
  images = _NUM_BATCHES.value * _BATCH_SIZE.value
  print(json.dumps({
      'images_per_sec': round(images / seconds, 1),
      'batch_size': _BATCH_SIZE.value, 'image_size': _IMAGE_SIZE.value,
      'num_batches': _NUM_BATCHES.value, 'seconds': round(seconds, 3),
      'randaugment_layers': _RANDAUGMENT.value, 'mixup': _MIX.value,
      'data': _DATA_DIR.value or 'fixture', 'cpu_count': os.cpu_count()}))


if __name__ == '__main__':
  app.run(main)
