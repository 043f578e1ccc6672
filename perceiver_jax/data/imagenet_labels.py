"""The 1,000 ILSVRC-2012 classes by index, and top-k predictions with names.

Class k is line k + 1 of imagenet2012_labels.txt (next to this file):
`<WordNet synset>\\t<names>`. The synsets are tensorflow-datasets' own
imagenet2012 label list in its order (datasets/imagenet2012/labels.txt),
which is the order of the labels our ImageNet pipeline yields and of the
released Perceiver checkpoints' logits. The names are the customary
comma-separated WordNet lemmas ('tench, Tinca tinca'), as tensorflow-datasets
lists them (datasets/siscore/labels.py, IMAGENET_LABELS_LIST) and as
DeepMind's ImageNet colab prints them. Both were copied from the installed
tensorflow-datasets 4.9; tests check the synsets against it.
"""

import functools
import importlib.resources
from typing import Any, Optional, Sequence

import numpy as np

NUM_CLASSES = 1000
_FILE = 'imagenet2012_labels.txt'


@functools.cache
def _table() -> tuple[tuple[str, str], ...]:
  text = importlib.resources.files(__package__).joinpath(_FILE).read_text(
      encoding='utf-8')
  rows = tuple(tuple(line.split('\t')) for line in text.splitlines())
  if len(rows) != NUM_CLASSES or any(len(r) != 2 for r in rows):
    raise RuntimeError(f'{_FILE} is damaged: expected {NUM_CLASSES} lines '
                       'of "synset<TAB>names".')
  return rows


def synsets() -> tuple[str, ...]:
  """WordNet ids ('n01440764', ...) of the 1,000 classes, by class index."""
  return tuple(synset for synset, _ in _table())


def class_names() -> tuple[str, ...]:
  """Names ('tench, Tinca tinca', ...) of the 1,000 classes, by index."""
  return tuple(name for _, name in _table())


def top_k(logits: np.ndarray, k: int = 5,
          names: Optional[Sequence[str]] = None,
          ids: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
  """The k most probable classes of one example, most probable first.

  Args:
    logits: float [K], one example's logits.
    k: how many classes; 1 <= k <= K.
    names: K class names; with `ids`, added to each entry.
    ids: K class ids (e.g. `synsets()`).

  Returns:
    k dicts {'class': index, 'prob': softmax probability, and 'name',
    'id' where given}. Ties keep the lower index first.

  Raises:
    ValueError: for logits that are not [K], a bad k, or names/ids of a
      length other than K.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 1:
    raise ValueError(f'logits must be [K] (one example); got {logits.shape}.')
  num = logits.shape[0]
  if not 1 <= k <= num:
    raise ValueError(f'k={k} must be in [1, {num}].')
  for what, values in (('names', names), ('ids', ids)):
    if values is not None and len(values) != num:
      raise ValueError(f'{len(values)} {what} for {num} logits.')
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  order = np.argsort(-probs, kind='stable')[:k]
  out = []
  for index in order:
    entry = {'class': int(index), 'prob': float(probs[index])}
    if ids is not None:
      entry['id'] = ids[index]
    if names is not None:
      entry['name'] = names[index]
    out.append(entry)
  return out
