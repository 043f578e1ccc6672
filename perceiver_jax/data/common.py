"""What every data loader shares: host sharding, pmap batch shapes, padding.

The batch contract, used by every loader and every experiment:

  A batch is a dict of NumPy arrays whose two leading axes are
  `batch_dims = (num_local_devices, per_device_batch)`, ready for `jax.pmap`.
  - 'inputs': the raw modality array, e.g. images [*batch_dims, H, W, C]
    (float32), or a dict of such arrays for multimodal inputs.
  - 'label': int32 [*batch_dims] class index (single-label data sets), or
    'labels': float32 [*batch_dims, num_classes] multi-hot (AudioSet).
  - 'mask': float32 [*batch_dims]; 1 for a real example, 0 for padding.
    Evaluation iterators pad their last batch so that every example is
    counted exactly once; training batches are all ones.

A loader is a function
  load(config, split, *, is_training, batch_dims, seed, start_step=0)
      -> Iterator[Batch]
registered by name in `perceiver_jax.data.LOADERS`. Training iterators are
infinite, shuffled and read this host's shard only; evaluation iterators make
exactly one pass over this host's shard. `start_step` is the number of
training steps already taken (a resumed run): in-memory loaders continue the
exact batch sequence, streaming (tf.data) loaders reseed from
(seed, start_step) so a resumed run never replays the same data order.
"""

from typing import Any, Iterator, Mapping, Sequence

import numpy as np

Batch = Mapping[str, Any]


def host_shard_bounds(num_examples: int, process_index: int,
                      process_count: int) -> tuple[int, int]:
  """Returns [start, end) of this host's contiguous share of a split.

  Shares differ in size by at most one example and cover the split exactly.

  Args:
    num_examples: size of the split.
    process_index: this host's index, `jax.process_index()`.
    process_count: number of hosts, `jax.process_count()`.

  Raises:
    ValueError: if process_index is not in [0, process_count).
  """
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index} not in [0, {process_count}).')
  start = num_examples * process_index // process_count
  end = num_examples * (process_index + 1) // process_count
  return start, end


def check_batch_dims(batch_dims: Sequence[int]) -> tuple[int, ...]:
  """Validates `(num_local_devices, per_device_batch)`; returns a tuple."""
  batch_dims = tuple(int(d) for d in batch_dims)
  if len(batch_dims) != 2 or min(batch_dims) < 1:
    raise ValueError(
        'batch_dims must be (num_local_devices, per_device_batch) with both '
        f'positive, got {batch_dims}.')
  return batch_dims


def pad_batch(batch: Mapping[str, np.ndarray],
              batch_size: int) -> dict[str, np.ndarray]:
  """Pads a flat batch [b, ...] to [batch_size, ...] and adds 'mask'.

  Padding rows repeat zeros; 'mask' is 1 for the b real rows and 0 after.
  Nested dicts (multimodal inputs) are padded leaf by leaf.
  """
  sizes = {np.shape(x)[0] for x in _leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(f'Batch leaves disagree on batch size: {sorted(sizes)}.')
  (size,) = sizes
  if size > batch_size:
    raise ValueError(f'Batch of {size} does not fit in {batch_size}.')

  def pad(x):
    x = np.asarray(x)
    widths = [(0, batch_size - size)] + [(0, 0)] * (x.ndim - 1)
    return np.pad(x, widths)

  padded = _map(pad, batch)
  mask = np.zeros([batch_size], np.float32)
  mask[:size] = 1.0
  if 'mask' in batch:
    mask *= pad(batch['mask']).astype(np.float32)
  padded['mask'] = mask
  return padded


def reshape_for_devices(batch: Mapping[str, Any],
                        batch_dims: Sequence[int]) -> dict[str, Any]:
  """Reshapes every leaf [prod(batch_dims), ...] -> [*batch_dims, ...]."""
  batch_dims = check_batch_dims(batch_dims)
  return _map(lambda x: np.reshape(x, batch_dims + np.shape(x)[1:]), batch)


def iterate_numpy(arrays: Mapping[str, np.ndarray], *, is_training: bool,
                  batch_dims: Sequence[int], seed: int,
                  shard: tuple[int, int] = (0, 1),
                  start_step: int = 0) -> Iterator[Batch]:
  """Batches in-memory arrays per the batch contract above.

  Args:
    arrays: dict of arrays sharing their leading (example) axis; a nested
      dict is allowed for multimodal inputs.
    is_training: infinite shuffled batches if True; else one ordered pass,
      the last batch padded and masked.
    batch_dims: (num_local_devices, per_device_batch).
    seed: shuffling seed (training only).
    shard: (process_index, process_count); each host reads its contiguous
      share of the examples.
    start_step: training batches to skip: the sequence continues exactly
      where a run that took start_step steps left off.

  Yields:
    Batches with leaves shaped [*batch_dims, ...] and a 'mask'.
  """
  batch_dims = check_batch_dims(batch_dims)
  batch_size = batch_dims[0] * batch_dims[1]
  (num_examples,) = {np.shape(x)[0] for x in _leaves(arrays)}
  start, end = host_shard_bounds(num_examples, *shard)
  arrays = _map(lambda x: np.asarray(x)[start:end], arrays)
  n = end - start
  if is_training:
    if n < batch_size:
      raise ValueError(
          f'This host holds {n} training examples, fewer than one batch of '
          f'{batch_size}; lower the batch size.')
    batches_per_epoch = n // batch_size
    epoch, skip = divmod(start_step, batches_per_epoch)
    while True:
      # Each epoch's order depends on (seed, epoch) only: resumable.
      order = np.random.default_rng([seed, epoch]).permutation(n)
      for i in range(skip * batch_size, n - batch_size + 1, batch_size):
        idx = order[i:i + batch_size]
        batch = _map(lambda x: x[idx], arrays)  # pylint: disable=cell-var-from-loop
        batch['mask'] = np.ones([batch_size], np.float32)
        yield reshape_for_devices(batch, batch_dims)
      epoch, skip = epoch + 1, 0
  else:
    # Every host runs as many eval batches as the largest share needs (its
    # extra batches are all padding), so pmapped collectives stay in step.
    process_count = shard[1]
    largest = max(b - a for a, b in (
        host_shard_bounds(num_examples, i, process_count)
        for i in range(process_count)))
    for i in range(0, max(largest, 1), batch_size):
      batch = _map(lambda x: x[i:i + batch_size], arrays)  # pylint: disable=cell-var-from-loop
      yield reshape_for_devices(pad_batch(batch, batch_size), batch_dims)


def _leaves(tree):
  if isinstance(tree, Mapping):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


def _map(fn, tree):
  if isinstance(tree, Mapping):
    return {k: _map(fn, v) for k, v in tree.items()}
  return fn(tree)
