"""Data loaders, by data set name (see common.py for the batch contract).

Loaders are imported lazily so that loading one data set never imports the
heavy dependencies (TensorFlow, PyAV, h5py) of another.
"""

import importlib
from typing import Callable

# name -> module under perceiver_jax.data providing `load` and `num_examples`.
LOADERS = {
    'digits': 'digits',
    'imagenet': 'imagenet',
    'modelnet40': 'modelnet40',
    'audioset': 'audioset',
}


def get_module(name: str):
  """Returns the module of data set `name`; ValueError if unknown."""
  if name not in LOADERS:
    raise ValueError(
        f'Unknown data set {name!r}; expected one of {sorted(LOADERS)}.')
  return importlib.import_module(f'perceiver_jax.data.{LOADERS[name]}')


def get_loader(name: str) -> Callable[..., object]:
  return get_module(name).load
