"""ModelNet40 point clouds (P1 Sec. 4.4, Tab. 4): readers, sampling, loader.

Two on-disk formats, chosen by `config.format`:
  'h5': PointNet's modelnet40_ply_hdf5_2048 directory: ply_data_train0..4.h5
    and ply_data_test0..1.h5 with datasets `data` [N, 2048, 3] float32 and
    `label` [N, 1] (any integer type); `train_files.txt` / `test_files.txt`
    list the h5 files of each split (the official lists carry a
    'data/modelnet40_ply_hdf5_2048/' prefix: only the basename is used, and
    it is resolved inside data_dir); `shape_names.txt` names the classes, one
    per line, label i = line i. Without a list file, `ply_data_<split>*.h5`
    in data_dir are read in sorted order.
  'off_cache': the directory written by scripts/prepare_modelnet40.py from
    the Princeton meshes (ModelNet40/<class>/{train,test}/*.off): one
    `<split>.npz` per split holding 'points' float32 [N, P, 3] (P points
    sampled uniformly on each mesh surface, see `sample_surface`), 'label'
    int32 [N] and 'files' (each mesh's path relative to the OFF root), plus
    `shape_names.txt` (the sorted class directory names, which is also
    PointNet's label order).

Preprocessing (P1 Sec. 4.4: "zero-centre; per-point scaling in [0.99, 1.01],
then zero-mean and unit-cube normalisation"), in NumPy on each host batch:
  train: a fresh random subset of `num_points` of the stored P points per
    example and batch (without replacement); zero-centre; multiply each
    point's (x, y, z) by its own scale s ~ U[scale_low, scale_high] (one
    scalar per point, the same for its three coordinates: about the centroid
    this is a +-1% radial jitter of every point); zero-centre again; divide
    by the largest |coordinate| so the cloud fits [-1, 1]^3 and touches it.
  eval: the first `num_points` stored points, as PointNet's own evaluation
    takes them (PointNet's files and our cache store points in random
    sampling order, so this is a fixed random subset), zero-centred and
    divided by the largest |coordinate|; no randomness.
Our reading of "per-point": a per-axis or per-cloud scale would be the other
candidates; one isotropic scale per cloud is undone by the unit-cube
normalisation that follows, so it cannot be what the paper meant.

Batches follow perceiver_jax.data.common: 'inputs' float32 [*batch_dims,
num_points, 3], 'label' int32 [*batch_dims], 'mask' float32 [*batch_dims].
Each host reads its contiguous share of the split; evaluation makes one pass
and pads its last batch with mask-0 rows (zeros).

Config fields read (see `default_config`): data_dir, format, num_points,
scale_low, scale_high, and num_classes (only to check that the data set's
classes fit the model).
"""

import os
from typing import Iterator, Optional, Sequence
import zipfile
import zlib

import jax
import ml_collections
import numpy as np

from perceiver_jax.data import common

NUM_CLASSES = 40
SPLITS = ('train', 'test')
SPLIT_SIZES = {'train': 9843, 'test': 2468}  # P1 Sec. 4.4.
FORMATS = ('h5', 'off_cache')
SHAPE_NAMES_FILE = 'shape_names.txt'
_AUGMENT_STREAM = 1120  # Separates augmentation seeds from shuffle seeds.

Mesh = tuple[np.ndarray, np.ndarray]  # vertices [V, 3], triangles [T, 3].


def default_config() -> ml_collections.ConfigDict:
  """The data section with the paper's values (P1 Sec. 4.4)."""
  return ml_collections.ConfigDict(dict(
      name='modelnet40', train_split='train', eval_split='test',
      num_train_examples=SPLIT_SIZES['train'], num_classes=NUM_CLASSES,
      input_shape=(2000, 3),
      data_dir=ml_collections.FieldReference(None, field_type=str),
      format='h5', num_points=2000, scale_low=0.99, scale_high=1.01))


# ---------------------------------------------------------------------------
# OFF meshes and surface sampling.
# ---------------------------------------------------------------------------


def parse_off(text: str, name: str = '<string>') -> Mesh:
  """Parses an OFF mesh; polygons are split into triangle fans.

  Accepts the header 'OFF' alone on its line followed by the counts line
  'V F E', or with the counts on the same line ('OFF 216 183 0', and the
  ModelNet quirk 'OFF216 183 0'); '#' starts a comment; blank lines are
  skipped; tokens after a vertex's 3 coordinates or after a face's indices
  (colours) are ignored.

  Args:
    text: the file's contents.
    name: file name used in error messages.

  Returns:
    (vertices float64 [V, 3], triangles int64 [T, 3]); a face of k vertices
    (v0, ..., vk-1) gives the k - 2 triangles (v0, vi, vi+1).

  Raises:
    ValueError: naming `name` and the problem, for a bad header or counts,
      too few or too many lines, a malformed vertex or face, a face index out
      of range, or an empty mesh.
  """
  lines = []
  for number, line in enumerate(text.splitlines(), start=1):
    line = line.split('#', 1)[0].strip()
    if line:
      lines.append((number, line))
  if not lines or not lines[0][1].startswith('OFF'):
    first = lines[0][1][:40] if lines else '(empty file)'
    raise ValueError(f'{name}: not an OFF file, the header is {first!r} '
                     "(expected it to start with 'OFF').")
  rest = lines[0][1][3:].strip()
  if rest:
    counts_line, body = (lines[0][0], rest), lines[1:]
  elif len(lines) > 1:
    counts_line, body = lines[1], lines[2:]
  else:
    raise ValueError(f'{name}: the OFF header has no vertex/face counts.')
  num_vertices, num_faces = _parse_counts(counts_line, name)
  if num_vertices == 0 or num_faces == 0:
    raise ValueError(f'{name}: empty mesh ({num_vertices} vertices, '
                     f'{num_faces} faces).')
  if len(body) != num_vertices + num_faces:
    raise ValueError(
        f'{name}: wrong counts: the header declares {num_vertices} vertices '
        f'and {num_faces} faces ({num_vertices + num_faces} lines) but '
        f'{len(body)} data lines follow.')
  vertices = _parse_vertices(body[:num_vertices], name)
  triangles = _parse_faces(body[num_vertices:], num_vertices, name)
  return vertices, triangles


def read_off(path: str) -> Mesh:
  """Reads an OFF file: (vertices [V, 3], triangles [T, 3]); see parse_off.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if the file is malformed (the message names the file).
  """
  with open(path, 'rb') as f:
    data = f.read()
  try:
    text = data.decode('ascii')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not an ASCII OFF file ({e}).') from e
  return parse_off(text, path)


def triangle_areas(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
  """Areas [T] of triangles [T, 3] (vertex indices) over vertices [V, 3]."""
  a, b, c = (vertices[triangles[:, i]] for i in range(3))
  return 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=-1)


def sample_surface(vertices: np.ndarray, triangles: np.ndarray,
                   num_points: int, rng: np.random.Generator,
                   name: str = 'mesh') -> np.ndarray:
  """Samples points uniformly on a triangle mesh's surface.

  Each point picks a triangle with probability proportional to its area,
  then a uniform point in it: barycentric (u, v) ~ U[0, 1]^2, reflected to
  (1 - u, 1 - v) when u + v > 1, at a + u (b - a) + v (c - a).

  Args:
    vertices: [V, 3] coordinates.
    triangles: [T, 3] vertex indices.
    num_points: points to draw (with replacement over triangles).
    rng: the random generator (seeded by the caller).
    name: mesh name for error messages.

  Returns:
    float32 [num_points, 3], in sampling (random) order.

  Raises:
    ValueError: if num_points < 1 or the mesh has zero (or non-finite) total
      area.
  """
  if num_points < 1:
    raise ValueError(f'num_points must be positive, got {num_points}.')
  vertices = np.asarray(vertices, np.float64)
  triangles = np.asarray(triangles, np.int64)
  areas = triangle_areas(vertices, triangles) if len(triangles) else [0.0]
  total = float(np.sum(areas))
  if not np.isfinite(total) or total <= 0:
    raise ValueError(f'{name}: the mesh has total surface area {total} '
                     f'({len(triangles)} triangles); cannot sample points.')
  chosen = rng.choice(len(triangles), size=num_points, p=areas / total)
  uv = rng.random((num_points, 2))
  flip = uv.sum(axis=1) > 1
  uv[flip] = 1 - uv[flip]
  a, b, c = (vertices[triangles[chosen, i]] for i in range(3))
  points = a + uv[:, :1] * (b - a) + uv[:, 1:] * (c - a)
  return points.astype(np.float32)


def _parse_counts(line: tuple[int, str], name: str) -> tuple[int, int]:
  number, text = line
  tokens = text.split()
  try:
    counts = [int(t) for t in tokens]
  except ValueError:
    counts = []
  if len(counts) not in (2, 3) or min(counts) < 0:
    raise ValueError(f'{name}: line {number}: bad OFF counts {text!r} '
                     '(expected "num_vertices num_faces [num_edges]").')
  return counts[0], counts[1]


def _parse_vertices(lines: list[tuple[int, str]], name: str) -> np.ndarray:
  """[V, 3] float64 from vertex lines; extra tokens (colours) are ignored."""
  tokens = [text.split()[:3] for _, text in lines]
  try:
    vertices = np.array(tokens, np.float64)
  except ValueError:  # A non-number, or ragged rows.
    vertices = None
  if (vertices is not None and vertices.shape == (len(lines), 3) and
      np.all(np.isfinite(vertices))):
    return vertices
  for (number, text), coordinates in zip(lines, tokens):
    try:
      ok = len(coordinates) == 3 and all(
          np.isfinite(float(x)) for x in coordinates)
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f'{name}: line {number}: bad vertex {text!r} '
                       '(expected 3 finite numbers).')
  raise AssertionError('unreachable: some vertex line is bad.')


def _parse_faces(lines: list[tuple[int, str]], num_vertices: int,
                 name: str) -> np.ndarray:
  """[T, 3] int64 triangles from face lines, fanning polygons."""
  tokens = [text.split() for _, text in lines]
  if all(len(t) == 4 and t[0] == '3' for t in tokens):  # All triangles.
    try:
      triangles = np.array([t[1:] for t in tokens], np.int64)
    except ValueError:
      triangles = None
    if triangles is not None:
      bad = (triangles < 0) | (triangles >= num_vertices)
      if bad.any():
        row = int(np.argwhere(bad)[0, 0])
        _face_error(name, lines[row], num_vertices)
      return triangles
  fans = []
  for line, t in zip(lines, tokens):
    try:
      size = int(t[0])
      corners = [int(x) for x in t[1:size + 1]] if size >= 3 else []
    except ValueError:
      corners = []
    if len(corners) < 3 or len(corners) != size:
      raise ValueError(f'{name}: line {line[0]}: bad face {line[1]!r} '
                       '(expected "k i_1 ... i_k" with k >= 3).')
    if min(corners) < 0 or max(corners) >= num_vertices:
      _face_error(name, line, num_vertices)
    fans.extend((corners[0], corners[i], corners[i + 1])
                for i in range(1, len(corners) - 1))
  return np.array(fans, np.int64).reshape(-1, 3)


def _face_error(name, line, num_vertices):
  raise ValueError(f'{name}: line {line[0]}: face {line[1]!r} has a vertex '
                   f'index out of range [0, {num_vertices}).')


# ---------------------------------------------------------------------------
# Reading a split.
# ---------------------------------------------------------------------------


def read_shape_names(data_dir: str) -> list[str]:
  """Class names from `data_dir/shape_names.txt`, one per line, in order.

  Raises:
    FileNotFoundError: if the file is missing.
    ValueError: if it is empty or repeats a name.
  """
  path = os.path.join(data_dir, SHAPE_NAMES_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'ModelNet40 class list {path} not found.')
  with open(path) as f:
    names = [line.strip() for line in f if line.strip()]
  if not names:
    raise ValueError(f'{path} lists no classes.')
  if len(set(names)) != len(names):
    raise ValueError(f'{path} repeats class names: {names}.')
  return names


def h5_files(data_dir: str, split: str) -> list[str]:
  """Paths of a split's PointNet h5 files, in list-file order.

  Uses `<split>_files.txt` (entries resolved by basename inside data_dir),
  else the sorted `ply_data_<split>*.h5` in data_dir.

  Raises:
    FileNotFoundError: if data_dir, a listed file, or any h5 file is missing.
    ValueError: for an unknown split or an empty list file.
  """
  _check_split(split)
  _check_dir(data_dir)
  listing = os.path.join(data_dir, f'{split}_files.txt')
  if os.path.isfile(listing):
    with open(listing) as f:
      entries = [line.strip() for line in f if line.strip()]
    if not entries:
      raise ValueError(f'{listing} lists no h5 files.')
    paths = [os.path.join(data_dir, os.path.basename(e)) for e in entries]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      raise FileNotFoundError(
          f'{listing} lists {len(missing)} h5 file(s) missing from '
          f'{data_dir}: {missing}.')
    return paths
  prefix = f'ply_data_{split}'
  paths = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir)
                 if f.startswith(prefix) and f.endswith('.h5'))
  if not paths:
    raise FileNotFoundError(
        f'No {split}_files.txt and no {prefix}*.h5 in {data_dir}: is it the '
        'modelnet40_ply_hdf5_2048 directory?')
  return paths


def read_h5_split(data_dir: str, split: str) -> tuple[np.ndarray,
                                                       np.ndarray]:
  """Reads a PointNet-format split: (points float32 [N, P, 3], labels int32
  [N]), checked against shape_names.txt.

  Raises:
    FileNotFoundError: for a missing directory, list entry or file.
    ValueError: for missing keys, bad shapes, data/label length mismatch,
      non-finite points, files with different P, or labels outside
      [0, number of shape names).
  """
  import h5py  # pylint: disable=g-import-not-at-top  # Only this format.
  _check_dir(data_dir)
  num_classes = len(read_shape_names(data_dir))
  points, labels = [], []
  for path in h5_files(data_dir, split):
    try:
      f = h5py.File(path, 'r')
    except OSError as e:
      raise ValueError(f'{path}: not a readable HDF5 file ({e}).') from e
    with f:
      missing = [k for k in ('data', 'label') if k not in f]
      if missing:
        raise ValueError(f'{path}: missing dataset(s) {missing}; it has '
                         f'{sorted(f.keys())}.')
      data, label = f['data'][()], f['label'][()]
    if data.ndim != 3 or data.shape[-1] != 3 or data.shape[1] < 1:
      raise ValueError(f'{path}: `data` has shape {data.shape}, expected '
                       '[N, P, 3].')
    if label.ndim == 2 and label.shape[1] == 1:
      label = label[:, 0]
    if label.ndim != 1 or not np.issubdtype(label.dtype, np.integer):
      raise ValueError(f'{path}: `label` has shape {label.shape} and dtype '
                       f'{label.dtype}, expected integers [N, 1] or [N].')
    if len(label) != len(data):
      raise ValueError(f'{path}: {len(data)} point clouds but {len(label)} '
                       'labels.')
    _check_labels(label, num_classes, path)
    if points and data.shape[1] != points[0].shape[1]:
      raise ValueError(f'{path}: {data.shape[1]} points per cloud, but the '
                       f'split\'s first file has {points[0].shape[1]}.')
    if not np.all(np.isfinite(data)):
      raise ValueError(f'{path}: `data` holds non-finite values.')
    points.append(data.astype(np.float32))
    labels.append(label.astype(np.int32))
  return np.concatenate(points), np.concatenate(labels)


def cache_path(data_dir: str, split: str) -> str:
  """The 'off_cache' file of a split: data_dir/<split>.npz."""
  return os.path.join(data_dir, f'{split}.npz')


def read_cache_split(data_dir: str, split: str) -> tuple[np.ndarray,
                                                          np.ndarray]:
  """Reads a prepare_modelnet40.py split: (points [N, P, 3], labels [N]).

  Raises:
    FileNotFoundError: if data_dir or the split's .npz is missing.
    ValueError: for a truncated or corrupt .npz (naming it), missing
      arrays, bad shapes, or out-of-range labels.
  """
  _check_split(split)
  _check_dir(data_dir)
  num_classes = len(read_shape_names(data_dir))
  path = cache_path(data_dir, split)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{path} not found: build the cache with scripts/prepare_modelnet40.py'
        f' --output_dir={data_dir}.')
  try:
    with np.load(path, allow_pickle=False) as f:
      files = f.files
      arrays = {k: f[k] for k in ('points', 'label') if k in files}
  except (zipfile.BadZipFile, EOFError, OSError, ValueError,
          zlib.error) as e:
    # numpy names no file: a truncated or overwritten copy, a full disk.
    raise ValueError(
        f'{path} is truncated or corrupt ({type(e).__name__}: {e}): build it '
        f'again with scripts/prepare_modelnet40.py --output_dir={data_dir}.'
    ) from e
  missing = [k for k in ('points', 'label') if k not in arrays]
  if missing:
    raise ValueError(f'{path}: missing array(s) {missing}; it has '
                     f'{sorted(files)}.')
  points, label = arrays['points'], arrays['label']
  if points.ndim != 3 or points.shape[-1] != 3 or label.shape != (
      len(points),):
    raise ValueError(f'{path}: points {points.shape} and label {label.shape}'
                     ' are not [N, P, 3] and [N].')
  _check_labels(label, num_classes, path)
  return points.astype(np.float32), label.astype(np.int32)


def read_split(config: ml_collections.ConfigDict,
               split: str) -> tuple[np.ndarray, np.ndarray]:
  """All of a split as stored: (points float32 [N, P, 3], labels [N])."""
  _check_config(config)
  if config.format == 'h5':
    return read_h5_split(config.data_dir, split)
  return read_cache_split(config.data_dir, split)


def class_names(config: ml_collections.ConfigDict) -> list[str]:
  """The data set's class names; label i is class_names(config)[i]."""
  _check_config(config)
  _check_dir(config.data_dir)
  return read_shape_names(config.data_dir)


def num_examples(split: str,
                 config: Optional[ml_collections.ConfigDict] = None) -> int:
  """Examples in `split`: of the data in config.data_dir if given, else the
  paper's counts (train 9,843, test 2,468)."""
  _check_split(split)
  if config is None:
    return SPLIT_SIZES[split]
  _check_config(config)
  if config.format == 'h5':
    import h5py  # pylint: disable=g-import-not-at-top
    total = 0
    for path in h5_files(config.data_dir, split):
      with h5py.File(path, 'r') as f:
        if 'data' not in f:
          raise ValueError(f'{path}: no `data` dataset; it has '
                           f'{sorted(f.keys())}.')
        total += f['data'].shape[0]
    return total
  return len(read_cache_split(config.data_dir, split)[1])


# ---------------------------------------------------------------------------
# Preprocessing and the loader.
# ---------------------------------------------------------------------------


def normalize(points: np.ndarray) -> np.ndarray:
  """Zero-mean and unit-cube normalisation of clouds [..., P, 3].

  Subtracts each cloud's mean and divides by its largest |coordinate|, so
  every cloud fits [-1, 1]^3 and touches its boundary (a cloud of identical
  points becomes all zeros).
  """
  points = points - points.mean(axis=-2, keepdims=True)
  extent = np.abs(points).max(axis=(-2, -1), keepdims=True)
  return points / np.where(extent > 0, extent, 1)


def scale_points(points: np.ndarray, rng: np.random.Generator, low: float,
                 high: float) -> np.ndarray:
  """Per-point scaling of clouds [..., P, 3]: each point's (x, y, z) times
  its own s ~ U[low, high] (one scalar per point, shared by its axes)."""
  return points * rng.uniform(low, high, size=points.shape[:-1] + (1,))


def augment(points: np.ndarray, rng: np.random.Generator, *,
            num_points: int, scale_low: float,
            scale_high: float) -> np.ndarray:
  """Training preprocessing of clouds [B, P, 3] -> float32 [B, num_points, 3].

  Per example: a random subset of num_points points (without replacement),
  zero-centred; `scale_points`; then `normalize`.
  """
  batch, stored = points.shape[:2]
  keep = np.argpartition(rng.random((batch, stored)), num_points - 1,
                         axis=1)[:, :num_points]
  points = np.take_along_axis(points, keep[..., None], axis=1)
  points = points - points.mean(axis=1, keepdims=True)
  points = scale_points(points, rng, scale_low, scale_high)
  return normalize(points).astype(np.float32)


def preprocess_eval(points: np.ndarray, num_points: int) -> np.ndarray:
  """Evaluation preprocessing [B, P, 3] -> float32 [B, num_points, 3]: the
  first num_points points, centred and normalised."""
  return normalize(points[:, :num_points]).astype(np.float32)


def load(config: ml_collections.ConfigDict, split: str, *, is_training: bool,
         batch_dims: Sequence[int], seed: int,
         start_step: int = 0) -> Iterator[common.Batch]:
  """Iterates over this host's share of a ModelNet40 split.

  Args:
    config: the data section (fields in the module docstring).
    split: 'train' or 'test'.
    is_training: infinite, shuffled, augmented batches if True; else one
      ordered pass, padded and masked.
    batch_dims: (num_local_devices, per_device_batch).
    seed: shuffling and augmentation seed (training only).
    start_step: training steps already taken; the batch sequence (order and
      augmentation) continues exactly where that run left off.

  Returns:
    An iterator of NumPy batches (see the module docstring).

  Raises:
    FileNotFoundError, ValueError: for a bad config or data (see
      read_h5_split / read_cache_split), or if the data hold fewer than
      num_points points per cloud.
  """
  _check_config(config)
  batch_dims = common.check_batch_dims(batch_dims)
  points, labels = read_split(config, split)
  num_classes = config.get('num_classes')
  names = read_shape_names(config.data_dir)
  if num_classes is not None and len(names) > num_classes:
    raise ValueError(f'{config.data_dir} has {len(names)} classes but '
                     f'data.num_classes is {num_classes}.')
  if points.shape[1] < config.num_points:
    raise ValueError(
        f'data.num_points={config.num_points} but the {split!r} data in '
        f'{config.data_dir} hold only {points.shape[1]} points per cloud.')
  shard = (jax.process_index(), jax.process_count())
  if not is_training:
    return common.iterate_numpy(
        {'inputs': preprocess_eval(points, config.num_points),
         'label': labels},
        is_training=False, batch_dims=batch_dims, seed=seed, shard=shard)
  batches = common.iterate_numpy(
      {'inputs': points, 'label': labels}, is_training=True,
      batch_dims=batch_dims, seed=seed, shard=shard, start_step=start_step)
  return _augmented(batches, config, seed=seed, start_step=start_step,
                    process_index=shard[0])


def _augmented(batches, config, *, seed, start_step, process_index):
  for step, batch in enumerate(batches, start=start_step):
    # Keyed by step, so a resumed run draws the same augmentation.
    rng = np.random.default_rng([seed, _AUGMENT_STREAM, process_index, step])
    inputs = batch['inputs']  # [D, B, P, 3]
    flat = augment(
        inputs.reshape((-1,) + inputs.shape[2:]), rng,
        num_points=config.num_points, scale_low=config.scale_low,
        scale_high=config.scale_high)
    yield {**batch, 'inputs': flat.reshape(inputs.shape[:2] + flat.shape[1:])}


def _check_labels(label: np.ndarray, num_classes: int, path: str) -> None:
  if len(label) and (label.min() < 0 or label.max() >= num_classes):
    bad = label[(label < 0) | (label >= num_classes)]
    raise ValueError(
        f'{path}: label {int(bad[0])} out of range [0, {num_classes}) given '
        f'the {num_classes} entries of {SHAPE_NAMES_FILE} '
        f'({len(bad)} bad labels).')


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'Unknown ModelNet40 split {split!r}; expected one of '
                     f'{SPLITS}.')


def _check_dir(data_dir: Optional[str]) -> None:
  if not data_dir:
    raise ValueError('data.data_dir is not set: point it at the '
                     'modelnet40_ply_hdf5_2048 directory (format h5) or at '
                     'the output of scripts/prepare_modelnet40.py (format '
                     'off_cache).')
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f'ModelNet40 data dir {data_dir} does not exist.')


def _check_config(config: ml_collections.ConfigDict) -> None:
  """Validates the fields read here; ValueError naming the bad value."""
  if config.format not in FORMATS:
    raise ValueError(f'Unknown data.format {config.format!r}; expected one '
                     f'of {FORMATS}.')
  if config.num_points < 1:
    raise ValueError(f'data.num_points must be positive, got '
                     f'{config.num_points}.')
  if not 0 < config.scale_low <= config.scale_high:
    raise ValueError(
        'Need 0 < data.scale_low <= data.scale_high, got '
        f'({config.scale_low}, {config.scale_high}).')
  _check_dir(config.data_dir)
