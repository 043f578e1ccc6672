"""scikit-learn's bundled handwritten digits: the default, download-free data.

1,797 grayscale 8x8 images of the digits 0-9 (UCI optdigits test set, 16
grey levels), shipped inside scikit-learn. A fixed, seeded permutation splits
them into 1,497 training and 300 test images ('train' / 'test'); the split
never changes with the training seed.

Batches follow perceiver_jax.data.common: 'inputs' float32 [*batch_dims, 8, 8,
1] in [0, 1], 'label' int32 [*batch_dims], 'mask' float32 [*batch_dims].
"""

import functools
from typing import Iterator, Sequence

import jax
import ml_collections
import numpy as np
from sklearn import datasets

from perceiver_jax.data import common

NUM_CLASSES = 10
NUM_TEST = 300
SPLIT_SEED = 20210304  # P1's arXiv date; fixes the held-out test split.
SPLITS = ('train', 'test')


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(name='digits'))


@functools.lru_cache(maxsize=1)
def _split_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  digits = datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]  # [N, 8, 8, 1]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
  test, train = order[:NUM_TEST], order[NUM_TEST:]
  return {'train': (images[train], labels[train]),
          'test': (images[test], labels[test])}


def num_examples(split: str) -> int:
  _check_split(split)
  return len(_split_arrays()[split][1])


def load(config: ml_collections.ConfigDict, split: str, *, is_training: bool,
         batch_dims: Sequence[int], seed: int,
         start_step: int = 0) -> Iterator[common.Batch]:
  """Iterates over this host's share of a split (see module docstring)."""
  del config  # Nothing to configure: the data ship with scikit-learn.
  _check_split(split)
  images, labels = _split_arrays()[split]
  return common.iterate_numpy(
      {'inputs': images, 'label': labels}, is_training=is_training,
      batch_dims=batch_dims, seed=seed,
      shard=(jax.process_index(), jax.process_count()), start_step=start_step)


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'Unknown digits split {split!r}; expected {SPLITS}.')
