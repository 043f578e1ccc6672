r"""Samples point clouds from the Princeton ModelNet40 meshes, once.

  python scripts/prepare_modelnet40.py --off_dir=ModelNet40 \
      --output_dir=MODELNET40_CACHE [--num_points=2048 --seed=0] \
      [--splits=train,test --num_workers=8 --skip_invalid]

--off_dir is the unzipped ModelNet40.zip: <class>/{train,test}/*.off. Classes
are its sub-directories in sorted order (label i = i-th name, the same order
as PointNet's shape_names.txt). Each mesh is parsed (perceiver_jax.data.
modelnet40.read_off: header quirks, comments, polygon fans) and
--num_points points are sampled uniformly on its surface (triangles chosen
with probability proportional to area, uniform barycentric coordinates),
seeded by (--seed, split, mesh index) so the output does not depend on
--num_workers. Like PointNet's h5 files, each cloud is then centred and
scaled into the unit sphere (the loader re-normalises anyway).

Output, read by the loader with data.format='off_cache' and
data.data_dir=MODELNET40_CACHE:
  <split>.npz: 'points' float32 [N, num_points, 3] (points in sampling
    order, i.e. random), 'label' int32 [N], 'files' [N] (paths relative to
    --off_dir), 'num_points' and 'seed' (scalars). Examples are in class,
    then file name order; the loader shuffles for training.
  shape_names.txt: the class names, one per line.
A JSON summary goes to stdout. Malformed meshes stop the run with a
ValueError naming the file, unless --skip_invalid lists them in the summary
and leaves them out. The full data (12,311 meshes) take ~300 MB at 2,048
points.
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np

from perceiver_jax.data import modelnet40


def find_meshes(off_dir: str,
                split: str) -> tuple[list[str], list[tuple[str, int]]]:
  """(class names, [(path relative to off_dir, label)]) of a split.

  Raises:
    FileNotFoundError: if off_dir is missing or has no class directories.
    ValueError: for an unknown split.
  """
  if split not in modelnet40.SPLITS:
    raise ValueError(f'Unknown split {split!r}; expected one of '
                     f'{modelnet40.SPLITS}.')
  if not os.path.isdir(off_dir):
    raise FileNotFoundError(f'OFF directory {off_dir} does not exist.')
  classes = sorted(
      d for d in os.listdir(off_dir)
      if not d.startswith('.') and os.path.isdir(os.path.join(off_dir, d)))
  if not classes:
    raise FileNotFoundError(
        f'{off_dir} has no class directories: expected the unzipped '
        'ModelNet40 root, <class>/{train,test}/*.off.')
  meshes = []
  for label, name in enumerate(classes):
    directory = os.path.join(off_dir, name, split)
    if os.path.isdir(directory):
      meshes += [(os.path.join(name, split, f), label)
                 for f in sorted(os.listdir(directory))
                 if f.lower().endswith('.off')]
  return classes, meshes


def prepare(*, off_dir: str, output_dir: str,
            splits: Sequence[str] = modelnet40.SPLITS,
            num_points: int = 2048, seed: int = 0, num_workers: int = 1,
            skip_invalid: bool = False) -> dict[str, Any]:
  """Writes <split>.npz + shape_names.txt into output_dir; returns a summary.

  Args:
    off_dir: the ModelNet40 root, <class>/{train,test}/*.off.
    output_dir: where the cache goes (created if needed).
    splits: subset of ('train', 'test').
    num_points: points sampled per mesh.
    seed: sampling seed.
    num_workers: parsing/sampling processes (1 = in this process).
    skip_invalid: leave out (and list) malformed meshes instead of failing.

  Returns:
    {'output_dir', 'classes', 'splits': {split: {'meshes', 'written',
    'skipped': [[file, reason], ...], 'path'}}}.

  Raises:
    FileNotFoundError: for a missing off_dir.
    ValueError: for bad settings, a split without meshes, a malformed mesh
      (unless skip_invalid), or an output_dir prepared with other classes.
  """
  if num_points < 1 or num_workers < 1:
    raise ValueError(f'num_points={num_points} and num_workers={num_workers}'
                     ' must be positive.')
  summary = {'output_dir': output_dir, 'classes': None, 'splits': {}}
  for split in splits:
    classes, meshes = find_meshes(off_dir, split)
    if not meshes:
      raise ValueError(f'No {split} meshes under {off_dir}/<class>/{split}/.')
    _write_shape_names(output_dir, classes)
    summary['classes'] = len(classes)
    split_id = modelnet40.SPLITS.index(split)
    jobs = [(os.path.join(off_dir, path), num_points, (seed, split_id, i))
            for i, (path, _) in enumerate(meshes)]
    points, labels, files, skipped = [], [], [], []
    for (path, label), (cloud, error) in zip(meshes, _run(jobs, num_workers)):
      if error is not None:
        if not skip_invalid:
          raise ValueError(error)
        skipped.append([path, error])
        continue
      points.append(cloud)
      labels.append(label)
      files.append(path)
    if not points:
      raise ValueError(f'Every {split} mesh under {off_dir} is invalid.')
    target = modelnet40.cache_path(output_dir, split)
    temporary = target + '.tmp.npz'
    np.savez(temporary, points=np.stack(points),
             label=np.array(labels, np.int32), files=np.array(files),
             num_points=np.int64(num_points), seed=np.int64(seed))
    os.replace(temporary, target)
    summary['splits'][split] = {'meshes': len(meshes),
                                'written': len(points), 'skipped': skipped,
                                'path': target}
  return summary


def sample_mesh(job: tuple[str, int, Sequence[int]]):
  """(path, num_points, seed) -> (float32 [num_points, 3] or None, error or
  None): the sampled cloud, centred and scaled into the unit sphere."""
  path, num_points, seed = job
  try:
    vertices, triangles = modelnet40.read_off(path)
    cloud = modelnet40.sample_surface(
        vertices, triangles, num_points, np.random.default_rng(list(seed)),
        name=path)
  except ValueError as e:
    return None, str(e)
  cloud -= cloud.mean(axis=0)
  radius = np.linalg.norm(cloud, axis=1).max()
  return cloud / (radius if radius > 0 else 1), None


def _run(jobs, num_workers):
  if num_workers == 1:
    return map(sample_mesh, jobs)
  # Spawned, not forked: forking a process that runs JAX can deadlock.
  context = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(num_workers,
                                              mp_context=context) as pool:
    return list(pool.map(sample_mesh, jobs, chunksize=16))


def _write_shape_names(output_dir: str, classes: Sequence[str]) -> None:
  path = os.path.join(output_dir, modelnet40.SHAPE_NAMES_FILE)
  if os.path.isfile(path):
    existing = modelnet40.read_shape_names(output_dir)
    if existing != list(classes):
      raise ValueError(
          f'{path} lists {len(existing)} other classes than the '
          f'{len(classes)} found now; use a fresh --output_dir.')
    return
  os.makedirs(output_dir, exist_ok=True)
  with open(path, 'w') as f:
    f.write(''.join(f'{name}\n' for name in classes))


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n', maxsplit=1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument('--off_dir', required=True)
  parser.add_argument('--output_dir', required=True)
  parser.add_argument('--splits', default='train,test')
  parser.add_argument('--num_points', type=int, default=2048)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--num_workers', type=int, default=1)
  parser.add_argument('--skip_invalid', action='store_true')
  args = parser.parse_args(argv)
  summary = prepare(
      off_dir=args.off_dir, output_dir=args.output_dir,
      splits=[s.strip() for s in args.splits.split(',') if s.strip()],
      num_points=args.num_points, seed=args.seed,
      num_workers=args.num_workers, skip_invalid=args.skip_invalid)
  json.dump(summary, sys.stdout, indent=1)
  sys.stdout.write('\n')
  return summary


if __name__ == '__main__':
  main()
