r"""Builds the small synthetic ModelNet40-format test fixture.

  python scripts/make_modelnet40_fixture.py \
      [--output_dir=tests/testdata/modelnet40]

Five classes of simple solids, named in sorted order 'box', 'cone',
'cylinder', 'pyramid', 'sphere' (labels 0-4), 20 train + 8 test instances
each. Every instance has random proportions, a random rotation about the up
(z) axis, a random size and a random offset, so a classifier must learn the
shapes. The proportion ranges keep classes apart (boxes of any proportions,
tall thin cylinders, squat wide cones, tall pyramids, near-round spheres):
logistic regression on histograms of the normalised clouds' radius, radius
in xy and height (128 points) scores 39/40 on the test split.

Written twice, in both formats perceiver_jax.data.modelnet40 reads:
  ModelNet40/<class>/{train,test}/<class>_<NNNN>.off: the Princeton layout
    (train instances 0001-0020, test 0021-0028). Boxes and pyramids keep
    quad faces and cylinders and cones n-gon caps (the reader fans them).
    Headers vary as in the real data: every third file puts the counts on
    the OFF line itself ('OFF42 80 0'), others use 'OFF' then a counts line,
    some carry '#' comments.
  modelnet40_ply_hdf5_2048/: PointNet's layout with ply_data_train0.h5 (60
    clouds), ply_data_train1.h5 (40), ply_data_test0.h5 (40), each with
    `data` float32 [N, 512, 3] and `label` uint8 [N, 1], examples shuffled;
    train_files.txt / test_files.txt with the official
    'data/modelnet40_ply_hdf5_2048/' prefix; shape_names.txt. Clouds are 512
    points (not 2048, to keep the fixture small) sampled by area on the same
    meshes, centred and scaled into the unit sphere as PointNet's are, and
    rounded to multiples of 2^-10 so that the gzip-compressed datasets stay
    small (h5py decompresses transparently).
The output is deterministic. Total size is about 0.63 MB.
"""

import argparse
import os
import shutil
from typing import Callable

import h5py
import numpy as np

from perceiver_jax.data import modelnet40

CLASSES = ('box', 'cone', 'cylinder', 'pyramid', 'sphere')
NUM_TRAIN, NUM_TEST = 20, 8
NUM_POINTS = 512
TRAIN_FILE_SIZES = (60, 40)  # Clouds per ply_data_train<i>.h5.
SEGMENTS = 16  # Sides of the polygons approximating circles.
SEED = 2103
_QUANTUM = 2.0 ** -10
_DEFAULT_OUTPUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests',
    'testdata', 'modelnet40')

Mesh = tuple[np.ndarray, list[list[int]]]  # vertices [V, 3], polygons.


def box(rng: np.random.Generator) -> Mesh:
  sx, sy, sz = rng.uniform(0.5, 1.5, size=3)
  corners = np.array([[x, y, z] for z in (0, 1) for y in (0, 1)
                      for x in (0, 1)], np.float64) - 0.5
  faces = [[0, 2, 3, 1], [4, 5, 7, 6], [0, 1, 5, 4], [2, 6, 7, 3],
           [0, 4, 6, 2], [1, 3, 7, 5]]
  return corners * [sx, sy, sz], faces


def pyramid(rng: np.random.Generator) -> Mesh:
  width, depth = rng.uniform(0.6, 0.9, size=2)
  height = rng.uniform(1.2, 1.6)
  vertices = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0],
                       [0, 0, 0]], np.float64) * [width / 2, depth / 2, 0]
  vertices[4, 2] = height
  faces = [[0, 3, 2, 1], [0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]]
  return vertices, faces


def _circle(radius: float, z: float) -> np.ndarray:
  angles = np.linspace(0, 2 * np.pi, SEGMENTS, endpoint=False)
  return np.stack([radius * np.cos(angles), radius * np.sin(angles),
                   np.full(SEGMENTS, z)], axis=1)


def cone(rng: np.random.Generator) -> Mesh:
  radius, height = rng.uniform(0.6, 0.8), rng.uniform(0.6, 0.9)
  vertices = np.concatenate([_circle(radius, 0), [[0, 0, height]]])
  apex = SEGMENTS
  faces = [list(range(SEGMENTS))[::-1]]
  faces += [[i, (i + 1) % SEGMENTS, apex] for i in range(SEGMENTS)]
  return vertices, faces


def cylinder(rng: np.random.Generator) -> Mesh:
  radius, height = rng.uniform(0.25, 0.35), rng.uniform(1.4, 1.8)
  vertices = np.concatenate([_circle(radius, 0), _circle(radius, height)])
  n = SEGMENTS
  faces = [list(range(n))[::-1], list(range(n, 2 * n))]
  faces += [[i, (i + 1) % n, n + (i + 1) % n, n + i] for i in range(n)]
  return vertices, faces


def sphere(rng: np.random.Generator) -> Mesh:
  """An icosphere (one subdivision: 42 vertices, 80 triangles), stretched."""
  t = (1 + 5 ** 0.5) / 2
  vertices = [[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t],
              [0, 1, t], [0, -1, -t], [0, 1, -t], [t, 0, -1], [t, 0, 1],
              [-t, 0, -1], [-t, 0, 1]]
  faces = [[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11],
           [1, 5, 9], [5, 11, 4], [11, 10, 2], [10, 7, 6], [7, 1, 8],
           [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9],
           [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]]
  midpoints = {}

  def midpoint(i, j):
    key = (min(i, j), max(i, j))
    if key not in midpoints:
      midpoints[key] = len(vertices)
      vertices.append(list((np.array(vertices[i]) + vertices[j]) / 2))
    return midpoints[key]

  subdivided = []
  for a, b, c in faces:
    ab, bc, ca = midpoint(a, b), midpoint(b, c), midpoint(c, a)
    subdivided += [[a, ab, ca], [b, bc, ab], [c, ca, bc], [ab, bc, ca]]
  vertices = np.array(vertices, np.float64)
  vertices /= np.linalg.norm(vertices, axis=1, keepdims=True)
  return vertices * rng.uniform(0.85, 1.15, size=3) * 0.6, subdivided


BUILDERS: dict[str, Callable[[np.random.Generator], Mesh]] = dict(
    box=box, cone=cone, cylinder=cylinder, pyramid=pyramid, sphere=sphere)


def make_instance(label: int, index: int) -> Mesh:
  """Class `label`'s instance `index`: shaped, turned about z, scaled, moved."""
  rng = np.random.default_rng([SEED, label, index])
  vertices, faces = BUILDERS[CLASSES[label]](rng)
  angle = rng.uniform(0, 2 * np.pi)
  cos, sin = np.cos(angle), np.sin(angle)
  rotation = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]])
  # Arbitrary units and placement, as in the Princeton meshes.
  vertices = vertices @ rotation.T * rng.uniform(5, 40)
  vertices += rng.uniform(-10, 10, size=3)
  return vertices, faces


def off_text(vertices: np.ndarray, faces: list[list[int]],
             style: int) -> str:
  """OFF text; style 0: counts on the OFF line ('OFF8 6 0'), 1: plain, 2:
  plain with comments."""
  counts = f'{len(vertices)} {len(faces)} 0'
  if style == 0:
    lines = [f'OFF{counts}']
  elif style == 1:
    lines = ['OFF', counts]
  else:
    lines = ['OFF', '# synthetic fixture mesh', counts, '']
  lines += [' '.join(f'{c:.4f}' for c in v) for v in vertices]
  lines += [' '.join(str(i) for i in [len(f)] + list(f)) for f in faces]
  return '\n'.join(lines) + '\n'


def write_off_tree(root: str) -> dict[str, list[tuple[str, int]]]:
  """Writes ModelNet40/<class>/<split>/*.off; returns split -> [(text,
  label)] in class then instance order."""
  texts = {'train': [], 'test': []}
  for label, name in enumerate(CLASSES):
    for index in range(NUM_TRAIN + NUM_TEST):
      split = 'train' if index < NUM_TRAIN else 'test'
      directory = os.path.join(root, name, split)
      os.makedirs(directory, exist_ok=True)
      text = off_text(*make_instance(label, index), style=index % 3)
      with open(os.path.join(directory, f'{name}_{index + 1:04d}.off'),
                'w') as f:
        f.write(text)
      texts[split].append((text, label))
  return texts


def write_h5(directory: str, texts: dict[str, list[tuple[str, int]]]) -> None:
  """PointNet-style h5 files + lists + shape_names.txt from the OFF texts."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, modelnet40.SHAPE_NAMES_FILE), 'w') as f:
    f.write('\n'.join(CLASSES) + '\n')
  for split_id, split in enumerate(('train', 'test')):
    clouds, labels = [], []
    for index, (text, label) in enumerate(texts[split]):
      vertices, triangles = modelnet40.parse_off(text)
      rng = np.random.default_rng([SEED, 100 + split_id, index])
      points = modelnet40.sample_surface(vertices, triangles, NUM_POINTS, rng)
      points -= points.mean(axis=0)
      points /= np.linalg.norm(points, axis=1).max()
      clouds.append(np.round(points / _QUANTUM) * _QUANTUM)
      labels.append(label)
    order = np.random.default_rng([SEED, 200 + split_id]).permutation(
        len(labels))
    clouds = np.array(clouds, np.float32)[order]
    labels = np.array(labels, np.uint8)[order, None]
    sizes = TRAIN_FILE_SIZES if split == 'train' else (len(labels),)
    starts = np.cumsum((0,) + sizes)
    names = []
    for i, (start, end) in enumerate(zip(starts[:-1], starts[1:])):
      names.append(f'ply_data_{split}{i}.h5')
      with h5py.File(os.path.join(directory, names[-1]), 'w') as f:
        f.create_dataset('data', data=clouds[start:end], compression='gzip',
                         compression_opts=9, shuffle=True)
        f.create_dataset('label', data=labels[start:end])
    with open(os.path.join(directory, f'{split}_files.txt'), 'w') as f:
      f.write(''.join(f'data/modelnet40_ply_hdf5_2048/{n}\n' for n in names))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n', maxsplit=1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument('--output_dir', default=_DEFAULT_OUTPUT)
  args = parser.parse_args(argv)
  for sub in ('ModelNet40', 'modelnet40_ply_hdf5_2048'):
    shutil.rmtree(os.path.join(args.output_dir, sub), ignore_errors=True)
  texts = write_off_tree(os.path.join(args.output_dir, 'ModelNet40'))
  write_h5(os.path.join(args.output_dir, 'modelnet40_ply_hdf5_2048'), texts)


if __name__ == '__main__':
  main()
