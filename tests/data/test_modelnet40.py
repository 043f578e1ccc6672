"""Tests for perceiver_jax.data.modelnet40 and scripts/prepare_modelnet40.py.

Runs on the synthetic fixture in tests/testdata/modelnet40 (built by
scripts/make_modelnet40_fixture.py): 5 solids, 20 train + 8 test each, as an
OFF tree and as PointNet-style h5 files.
"""

import os
import re
import shutil

import h5py
import numpy as np
import pytest

from perceiver_jax import data as data_lib
from perceiver_jax.data import modelnet40
from scripts import make_modelnet40_fixture
from scripts import prepare_modelnet40

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                       'testdata', 'modelnet40')
H5_DIR = os.path.join(FIXTURE, 'modelnet40_ply_hdf5_2048')
OFF_DIR = os.path.join(FIXTURE, 'ModelNet40')
CLASSES = ['box', 'cone', 'cylinder', 'pyramid', 'sphere']
NUM_TRAIN, NUM_TEST = 100, 40

UNIT_CUBE = """OFF
# a unit cube centred at the origin, quad faces
8 6 12
-0.5 -0.5 -0.5
0.5 -0.5 -0.5
-0.5 0.5 -0.5
0.5 0.5 -0.5
-0.5 -0.5 0.5
0.5 -0.5 0.5
-0.5 0.5 0.5
0.5 0.5 0.5
4 0 2 3 1
4 4 5 7 6
4 0 1 5 4
4 2 6 7 3
4 0 4 6 2
4 1 3 7 5
"""


def _config(data_dir=H5_DIR, **kwargs):
  config = modelnet40.default_config()
  config.data_dir = data_dir
  config.num_points = 64
  config.update(kwargs)
  return config


def _write(path, text):
  with open(path, 'w') as f:
    f.write(text)
  return str(path)


def _on_mesh(points, vertices, triangles, tol=1e-4):
  """For each point [P, 3]: does it lie on some triangle (within tol)?"""
  a, b, c = (vertices[triangles[:, i]] for i in range(3))  # [T, 3] each
  normal = np.cross(b - a, c - a)
  normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
  rel = points[:, None] - a[None]  # [P, T, 3]
  height = np.einsum('ptk,tk->pt', rel, normal)
  flat = rel - height[..., None] * normal[None]
  # Barycentric coordinates of the projection in each triangle.
  e1, e2 = b - a, c - a
  d11, d12, d22 = (np.sum(x * y, -1) for x, y in ((e1, e1), (e1, e2),
                                                    (e2, e2)))
  f1, f2 = np.einsum('ptk,tk->pt', flat, e1), np.einsum('ptk,tk->pt', flat,
                                                         e2)
  det = d11 * d22 - d12 ** 2
  v = (d22 * f1 - d12 * f2) / det
  w = (d11 * f2 - d12 * f1) / det
  inside = (v >= -tol) & (w >= -tol) & (v + w <= 1 + tol)
  return np.any(inside & (np.abs(height) < tol), axis=1)


# OFF parsing.


def test_parse_off_header_variants_and_fans():
  quad = '4 0 1 2 3\n'
  verts = '0 0 0\n1 0 0\n1 1 0\n0 1 0\n'
  for header in ('OFF\n4 1 0\n', 'OFF4 1 0\n', 'OFF 4 1 0\n',
                 '# comment\nOFF\n\n# counts next\n4 1 0\n'):
    vertices, triangles = modelnet40.parse_off(header + verts + quad)
    np.testing.assert_array_equal(vertices[2], [1, 1, 0])
    np.testing.assert_array_equal(triangles, [[0, 1, 2], [0, 2, 3]])
  # A pentagon fans into 3 triangles; colour values are ignored.
  text = ('OFF\n5 2 0\n0 0 0\n1 0 0 255 0 0\n1 1 0\n0 1 0\n-1 0.5 0\n'
          '5 0 1 2 3 4\n3 0 1 2 0.5 0.5 0.5 # coloured\n')
  _, triangles = modelnet40.parse_off(text)
  np.testing.assert_array_equal(
      triangles, [[0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 1, 2]])
  vertices, triangles = modelnet40.parse_off(UNIT_CUBE)
  assert vertices.shape == (8, 3) and triangles.shape == (12, 3)
  assert modelnet40.triangle_areas(vertices, triangles).sum() == (
      pytest.approx(6.0))


@pytest.mark.parametrize('text, match', [
    ('', 'not an OFF file'),
    ('PLY\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n', 'not an OFF file'),
    ('OFF\n', 'no vertex/face counts'),
    ('OFF\nthree 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n', 'bad OFF counts'),
    ('OFFX 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n', 'bad OFF counts'),
    ('OFF\n4 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n', 'wrong counts'),
    ('OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n3 0 1 2\n', 'wrong counts'),
    ('OFF\n3 1 0\n0 0 0\n1 0\n0 1 0\n3 0 1 2\n', 'bad vertex'),
    ('OFF\n3 1 0\n0 0 0\n1 x 0\n0 1 0\n3 0 1 2\n', 'bad vertex'),
    ('OFF\n3 1 0\n0 0 0\n1 nan 0\n0 1 0\n3 0 1 2\n', 'bad vertex'),
    ('OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 3\n', 'out of range'),
    ('OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n4 0 1 2 -1\n', 'out of range'),
    ('OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n2 0 1\n', 'bad face'),
    ('OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n4 0 1 2\n', 'bad face'),
    ('OFF\n0 0 0\n', 'empty mesh'),
    ('OFF\n3 0 0\n0 0 0\n1 0 0\n0 1 0\n', 'empty mesh'),
])
def test_read_off_rejects_malformed_files(tmp_path, text, match):
  path = _write(tmp_path / 'bad_0001.off', text)
  with pytest.raises(ValueError, match=match) as error:
    modelnet40.read_off(path)
  assert path in str(error.value)


def test_fixture_off_tree_has_the_header_quirk():
  quirky = 0
  for name in CLASSES:
    for split, count in (('train', 20), ('test', 8)):
      files = sorted(os.listdir(os.path.join(OFF_DIR, name, split)))
      assert len(files) == count
      for f in files:
        path = os.path.join(OFF_DIR, name, split, f)
        with open(path) as handle:
          quirky += bool(re.match(r'OFF\d+ \d+ \d+$', handle.readline()))
        vertices, triangles = modelnet40.read_off(path)
        assert len(vertices) >= 5 and len(triangles) >= 6
  assert quirky == 5 * 10  # Every third file of 28 per class.


# Surface sampling.


def test_samples_lie_on_the_cube_and_spread_by_area():
  vertices, triangles = modelnet40.parse_off(UNIT_CUBE)
  n = 60_000
  points = modelnet40.sample_surface(vertices, triangles, n,
                                     np.random.default_rng(0))
  assert points.shape == (n, 3) and points.dtype == np.float32
  np.testing.assert_allclose(np.abs(points).max(axis=1), 0.5, atol=1e-6)
  # Each face holds ~1/6 of the points; 5 binomial standard deviations.
  face = np.argmax(np.abs(points), axis=1) * 2 + (
      np.take_along_axis(points, np.argmax(np.abs(points), 1)[:, None],
                         1)[:, 0] > 0)
  counts = np.bincount(face, minlength=6)
  assert np.all(np.abs(counts - n / 6) < 5 * np.sqrt(n * 5 / 36))
  # Uniform within faces: the z = 0.5 face's points average to its centre.
  top = points[points[:, 2] > 0.4999]
  np.testing.assert_allclose(top[:, :2].mean(0), [0, 0], atol=0.02)


def test_triangle_with_twice_the_area_gets_twice_the_points():
  # Triangle 0 (area 0.5) at z = 0, triangle 1 (area 1.0) at z = 1.
  text = ('OFF\n6 2 0\n0 0 0\n1 0 0\n0 1 0\n0 0 1\n2 0 1\n0 1 1\n'
          '3 0 1 2\n3 3 4 5\n')
  vertices, triangles = modelnet40.parse_off(text)
  n = 30_000
  points = modelnet40.sample_surface(vertices, triangles, n,
                                     np.random.default_rng(1))
  big = np.sum(points[:, 2] > 0.5)
  assert abs(big - 2 * n / 3) < 5 * np.sqrt(n * 2 / 9)
  assert 1.9 < big / (n - big) < 2.1
  # Uniform barycentric sampling: each triangle's points average to its
  # centroid.
  np.testing.assert_allclose(points[points[:, 2] > 0.5].mean(0),
                             [2 / 3, 1 / 3, 1], atol=0.01)
  np.testing.assert_allclose(points[points[:, 2] < 0.5].mean(0),
                             [1 / 3, 1 / 3, 0], atol=0.01)


def test_fixture_meshes_samples_lie_on_their_surfaces():
  for name in ('sphere', 'cone', 'pyramid'):
    path = os.path.join(OFF_DIR, name, 'train', f'{name}_0001.off')
    vertices, triangles = modelnet40.read_off(path)
    points = modelnet40.sample_surface(vertices, triangles, 300,
                                       np.random.default_rng(2))
    scale = np.abs(vertices).max()
    assert np.all(_on_mesh(points / scale, vertices / scale, triangles)), name
    # Not vacuous: points pushed off the surface fail the check.
    centre = vertices.mean(0)
    pushed = centre + (points - centre) * 1.05
    assert not np.any(_on_mesh(pushed / scale, vertices / scale, triangles))


def test_sampling_is_seeded_and_rejects_zero_area():
  vertices, triangles = modelnet40.parse_off(UNIT_CUBE)
  a, b, c = (modelnet40.sample_surface(vertices, triangles, 50,
                                       np.random.default_rng(s))
             for s in (3, 3, 4))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  flat = modelnet40.parse_off('OFF\n3 1 0\n0 0 0\n1 1 1\n2 2 2\n3 0 1 2\n')
  with pytest.raises(ValueError, match='flat.off: .*total surface area 0'):
    modelnet40.sample_surface(*flat, 10, np.random.default_rng(0),
                              name='flat.off')


# PointNet h5 reader.


def test_read_h5_fixture():
  names = modelnet40.read_shape_names(H5_DIR)
  assert names == CLASSES
  # The list files carry the official 'data/modelnet40_ply_hdf5_2048/'
  # prefix; entries resolve by basename inside the data dir.
  files = modelnet40.h5_files(H5_DIR, 'train')
  assert [os.path.basename(f) for f in files] == ['ply_data_train0.h5',
                                                    'ply_data_train1.h5']
  for split, size, per_class in (('train', NUM_TRAIN, 20),
                                 ('test', NUM_TEST, 8)):
    points, labels = modelnet40.read_h5_split(H5_DIR, split)
    assert points.shape == (size, 512, 3) and points.dtype == np.float32
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(labels), [per_class] * 5)
    assert modelnet40.num_examples(split, _config()) == size
  assert modelnet40.num_examples('train') == 9843
  assert modelnet40.num_examples('test') == 2468


def test_h5_without_list_files_reads_sorted_globs(tmp_path):
  directory = str(tmp_path / 'h5')
  shutil.copytree(H5_DIR, directory)
  os.remove(os.path.join(directory, 'train_files.txt'))
  expected = modelnet40.read_h5_split(H5_DIR, 'train')
  got = modelnet40.read_h5_split(directory, 'train')
  for e, g in zip(expected, got):
    np.testing.assert_array_equal(e, g)


def _make_h5_dir(tmp_path, files=None, names=('a', 'b', 'c'), listed=None):
  """A PointNet-style dir; files: {name: {key: array}}."""
  directory = tmp_path / 'h5'
  directory.mkdir()
  if names is not None:
    _write(directory / 'shape_names.txt', ''.join(f'{n}\n' for n in names))
  if files is None:
    files = {'ply_data_train0.h5': dict(
        data=np.zeros((4, 16, 3), np.float32),
        label=np.array([[0], [1], [2], [1]], np.uint8))}
  for name, arrays in files.items():
    with h5py.File(directory / name, 'w') as f:
      for key, value in arrays.items():
        f.create_dataset(key, data=value)
  listed = list(files) if listed is None else listed
  _write(directory / 'train_files.txt',
         ''.join(f'data/modelnet40_ply_hdf5_2048/{n}\n' for n in listed))
  return str(directory)


def test_h5_minimal_dir_reads(tmp_path):
  points, labels = modelnet40.read_h5_split(_make_h5_dir(tmp_path), 'train')
  assert points.shape == (4, 16, 3)
  np.testing.assert_array_equal(labels, [0, 1, 2, 1])


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(names=None), FileNotFoundError, 'shape_names.txt'),
    (dict(listed=['ply_data_train0.h5', 'ply_data_train9.h5']),
     FileNotFoundError, r'missing .*ply_data_train9\.h5'),
    (dict(files={'x.h5': dict(data=np.zeros((2, 8, 3), np.float32))}),
     ValueError, r"x\.h5: missing dataset\(s\) \['label'\]"),
    (dict(files={'x.h5': dict(label=np.zeros((2, 1)))}),
     ValueError, r"x\.h5: missing dataset\(s\) \['data'\]"),
    (dict(files={'x.h5': dict(data=np.zeros((2, 8, 3), np.float32),
                              label=np.array([[0], [3]]))}),
     ValueError, r'label 3 out of range \[0, 3\)'),
    (dict(files={'x.h5': dict(data=np.zeros((2, 8, 3), np.float32),
                              label=np.array([[0], [-1]]))}),
     ValueError, r'label -1 out of range'),
    (dict(files={'x.h5': dict(data=np.zeros((3, 8, 3), np.float32),
                              label=np.zeros((2, 1), np.int64))}),
     ValueError, '3 point clouds but 2 labels'),
    (dict(files={'x.h5': dict(data=np.zeros((2, 8, 2), np.float32),
                              label=np.zeros((2, 1), np.int64))}),
     ValueError, r'shape \(2, 8, 2\)'),
    (dict(files={'x.h5': dict(data=np.zeros((2, 8, 3), np.float32),
                              label=np.zeros((2, 1), np.float32))}),
     ValueError, 'expected integers'),
    (dict(files={'x.h5': dict(data=np.full((2, 8, 3), np.nan, np.float32),
                              label=np.zeros((2, 1), np.int64))}),
     ValueError, 'non-finite'),
    (dict(files={'x.h5': dict(data=np.zeros((2, 8, 3), np.float32),
                              label=np.zeros((2, 1), np.int64)),
                 'y.h5': dict(data=np.zeros((2, 9, 3), np.float32),
                              label=np.zeros((2, 1), np.int64))}),
     ValueError, r'y\.h5: 9 points per cloud'),
])
def test_h5_errors(tmp_path, kwargs, error, match):
  directory = _make_h5_dir(tmp_path, **kwargs)
  with pytest.raises(error, match=match):
    modelnet40.read_h5_split(directory, 'train')


def test_missing_dirs_and_bad_config(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    modelnet40.read_h5_split(str(tmp_path / 'nope'), 'train')
  _write(tmp_path / 'shape_names.txt', 'a\n')
  with pytest.raises(FileNotFoundError, match='ply_data_test'):
    modelnet40.read_h5_split(str(tmp_path), 'test')
  with pytest.raises(FileNotFoundError, match='prepare_modelnet40'):
    modelnet40.read_cache_split(str(tmp_path), 'train')
  with pytest.raises(ValueError, match='data_dir is not set'):
    modelnet40.class_names(modelnet40.default_config())
  with pytest.raises(ValueError, match="split 'val'"):
    modelnet40.h5_files(H5_DIR, 'val')
  for field, value, match in (('format', 'ply', "format 'ply'"),
                              ('num_points', 0, 'num_points'),
                              ('scale_low', 1.2, 'scale_low')):
    with pytest.raises(ValueError, match=match):
      modelnet40.load(_config(**{field: value}), 'train', is_training=True,
                      batch_dims=(1, 2), seed=0)
  with pytest.raises(ValueError, match='hold only 512 points'):
    modelnet40.load(_config(num_points=600), 'test', is_training=False,
                    batch_dims=(1, 2), seed=0)
  with pytest.raises(ValueError, match='5 classes but data.num_classes is 4'):
    modelnet40.load(_config(num_classes=4), 'test', is_training=False,
                    batch_dims=(1, 2), seed=0)


# Preprocessing.


def test_normalize_zero_mean_unit_cube():
  rng = np.random.default_rng(0)
  clouds = rng.normal(size=(4, 100, 3)) * [[[1, 2, 3]]] + 7
  out = modelnet40.normalize(clouds)
  np.testing.assert_allclose(out.mean(axis=1), 0, atol=1e-12)
  np.testing.assert_allclose(np.abs(out).max(axis=(1, 2)), 1)
  # The same isotropic map for all points of a cloud: shapes kept.
  centred = clouds - clouds.mean(axis=1, keepdims=True)
  ratio = out / centred
  np.testing.assert_allclose(ratio, ratio[:, :1, :1] * np.ones_like(ratio))
  np.testing.assert_array_equal(modelnet40.normalize(np.ones((1, 5, 3))), 0)


def test_scale_points_per_point_in_range():
  rng = np.random.default_rng(0)
  points = rng.normal(size=(8, 500, 3)) + 3  # No zero coordinates.
  scaled = modelnet40.scale_points(points, rng, 0.99, 1.01)
  ratio = scaled / points
  # One scale per point, shared by x, y, z ...
  np.testing.assert_allclose(ratio, ratio[..., :1] * np.ones(3))
  # ... in [0.99, 1.01], filling the range, and varying within a cloud.
  assert ratio.min() >= 0.99 and ratio.max() <= 1.01
  assert ratio.min() < 0.9905 and ratio.max() > 1.0095
  assert np.all(ratio[..., 0].std(axis=1) > 0.004)


def test_augment_subsamples_scales_and_normalises():
  rng = np.random.default_rng(0)
  clouds = rng.normal(size=(3, 40, 3)) * [[[1, 2, 0.5]]] + 5
  out = modelnet40.augment(clouds, np.random.default_rng(1), num_points=30,
                           scale_low=0.99, scale_high=1.01)
  assert out.shape == (3, 30, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out.mean(axis=1), 0, atol=1e-6)
  np.testing.assert_allclose(np.abs(out).max(axis=(1, 2)), 1, rtol=1e-6)
  plain = modelnet40.augment(clouds, np.random.default_rng(1), num_points=30,
                             scale_low=1.0, scale_high=1.0)
  # Subsets are drawn without replacement and differ between examples.
  assert all(len(np.unique(c, axis=0)) == 30 for c in plain)
  assert not np.allclose(np.sort(plain[0], 0), np.sort(plain[1], 0))
  # Scaling moves each point by about +-1% of the extent (up to 2x after
  # re-normalisation), never more.
  shift = np.abs(out - plain).max()
  assert 0.002 < shift < 0.04
  # Keeping all points: exactly a permutation of the normalised cloud.
  everything = modelnet40.augment(clouds, np.random.default_rng(2),
                                  num_points=40, scale_low=1.0,
                                  scale_high=1.0)
  for cloud, permuted in zip(modelnet40.normalize(clouds), everything):
    assert not np.allclose(cloud, permuted)
    np.testing.assert_allclose(cloud[np.lexsort(cloud.T)],
                               permuted[np.lexsort(permuted.T)], atol=1e-6)


# The loader.


def test_registered_with_paper_defaults():
  assert data_lib.get_module('modelnet40') is modelnet40
  config = modelnet40.default_config()
  assert config.num_points == 2000 and config.format == 'h5'
  assert (config.scale_low, config.scale_high) == (0.99, 1.01)
  assert config.num_classes == 40 and config.input_shape == (2000, 3)
  assert modelnet40.class_names(_config()) == CLASSES


def test_train_batches():
  config = _config()
  it = modelnet40.load(config, 'train', is_training=True, batch_dims=(8, 2),
                       seed=0)
  batches = [next(it) for _ in range(8)]  # 128 > 100: crosses an epoch.
  for batch in batches:
    assert batch['inputs'].shape == (8, 2, 64, 3)
    assert batch['inputs'].dtype == np.float32
    assert batch['label'].shape == (8, 2) and batch['label'].dtype == np.int32
    np.testing.assert_array_equal(batch['mask'], np.ones((8, 2)))
    np.testing.assert_allclose(batch['inputs'].mean(axis=2), 0, atol=1e-6)
    np.testing.assert_allclose(np.abs(batch['inputs']).max(axis=(2, 3)), 1,
                               rtol=1e-6)
  # 6 batches of 16 per epoch: each training example at most once per epoch.
  assert len(np.concatenate([b['label'].ravel() for b in batches[:6]])) == 96
  # Seeded: the same sequence again, another seed differs.
  again = modelnet40.load(config, 'train', is_training=True,
                          batch_dims=(8, 2), seed=0)
  np.testing.assert_array_equal(next(again)['inputs'], batches[0]['inputs'])
  other = modelnet40.load(config, 'train', is_training=True,
                          batch_dims=(8, 2), seed=1)
  assert not np.allclose(next(other)['inputs'], batches[0]['inputs'])
  # A resumed run continues the exact sequence, augmentation included.
  resumed = modelnet40.load(config, 'train', is_training=True,
                            batch_dims=(8, 2), seed=0, start_step=7)
  batch = next(resumed)
  for key in ('inputs', 'label'):
    np.testing.assert_array_equal(batch[key], batches[7][key])


def test_eval_counts_every_example_once_with_padding():
  config = _config()
  points, labels = modelnet40.read_h5_split(H5_DIR, 'test')
  batches = list(modelnet40.load(config, 'test', is_training=False,
                                 batch_dims=(8, 3), seed=0))
  assert len(batches) == 2  # 40 examples in batches of 24.
  inputs = np.concatenate([b['inputs'].reshape(24, 64, 3) for b in batches])
  label = np.concatenate([b['label'].ravel() for b in batches])
  mask = np.concatenate([b['mask'].ravel() for b in batches])
  assert batches[0]['inputs'].shape == (8, 3, 64, 3)
  np.testing.assert_array_equal(mask, [1] * 40 + [0] * 8)
  np.testing.assert_array_equal(label[:40], labels)
  np.testing.assert_array_equal(inputs[40:], 0)
  # No augmentation: the first 64 stored points, centred and normalised.
  np.testing.assert_allclose(inputs[:40],
                             modelnet40.normalize(points[:, :64]), atol=1e-6)
  again = list(modelnet40.load(config, 'test', is_training=False,
                               batch_dims=(8, 3), seed=5))
  np.testing.assert_array_equal(again[1]['inputs'], batches[1]['inputs'])


# scripts/prepare_modelnet40.py: OFF tree -> cache -> loader.


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('modelnet40_cache'))
  summary = prepare_modelnet40.main([f'--off_dir={OFF_DIR}',
                                     f'--output_dir={out}',
                                     '--num_points=256', '--seed=3'])
  return out, summary


def test_prepare_round_trip(cache):
  out, summary = cache
  assert summary['classes'] == 5
  for split, size in (('train', NUM_TRAIN), ('test', NUM_TEST)):
    assert summary['splits'][split]['written'] == size
    assert summary['splits'][split]['skipped'] == []
  config = _config(out, format='off_cache')
  assert modelnet40.class_names(config) == CLASSES
  assert modelnet40.num_examples('test', config) == NUM_TEST
  with np.load(modelnet40.cache_path(out, 'test')) as f:
    files, points = list(f['files']), f['points']
    np.testing.assert_array_equal(f['label'], np.repeat(np.arange(5), 8))
  assert files[0] == os.path.join('box', 'test', 'box_0021.off')
  assert points.shape == (NUM_TEST, 256, 3) and points.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(points, axis=-1).max(-1), 1,
                             rtol=1e-5)
  # The cached points lie on their meshes (undoing the unit-sphere scaling).
  vertices, triangles = modelnet40.read_off(os.path.join(OFF_DIR, files[-1]))
  sampled = modelnet40.sample_surface(vertices, triangles, 256,
                                      np.random.default_rng([3, 1, 39]))
  centred = sampled - sampled.mean(0)
  np.testing.assert_allclose(
      points[-1], centred / np.linalg.norm(centred, axis=1).max(), atol=1e-5)
  # The loader reads the cache like the h5 files.
  batch = next(modelnet40.load(config, 'train', is_training=True,
                               batch_dims=(8, 2), seed=0))
  assert batch['inputs'].shape == (8, 2, 64, 3)
  batches = list(modelnet40.load(config, 'test', is_training=False,
                                 batch_dims=(8, 2), seed=0))
  assert sum(b['mask'].sum() for b in batches) == NUM_TEST


def test_prepare_skips_or_fails_on_bad_meshes(tmp_path, cache):
  off_dir = tmp_path / 'ModelNet40'
  for name in ('box', 'cone'):
    shutil.copytree(os.path.join(OFF_DIR, name), off_dir / name)
  bad = _write(off_dir / 'cone' / 'test' / 'cone_0099.off',
               'OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 5\n')
  with pytest.raises(ValueError, match=re.escape(bad) + '.*out of range'):
    prepare_modelnet40.prepare(off_dir=str(off_dir),
                               output_dir=str(tmp_path / 'a'),
                               splits=['test'], num_points=16)
  summary = prepare_modelnet40.prepare(
      off_dir=str(off_dir), output_dir=str(tmp_path / 'b'), splits=['test'],
      num_points=16, skip_invalid=True)
  result = summary['splits']['test']
  assert (result['meshes'], result['written']) == (17, 16)
  assert result['skipped'][0][0] == os.path.join('cone', 'test',
                                                 'cone_0099.off')
  # Other classes than an existing cache's: refused.
  with pytest.raises(ValueError, match='other classes'):
    prepare_modelnet40.prepare(off_dir=str(off_dir), output_dir=cache[0],
                               splits=['test'], num_points=16)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    prepare_modelnet40.prepare(off_dir=str(tmp_path / 'none'),
                               output_dir=str(tmp_path / 'c'))


def test_prepare_workers_match_single_process(tmp_path, cache):
  off_dir = tmp_path / 'ModelNet40'
  shutil.copytree(os.path.join(OFF_DIR, 'pyramid'), off_dir / 'pyramid')
  kwargs = dict(off_dir=str(off_dir), splits=['test'], num_points=32, seed=3)
  prepare_modelnet40.prepare(output_dir=str(tmp_path / 'one'), **kwargs)
  prepare_modelnet40.prepare(output_dir=str(tmp_path / 'two'),
                             num_workers=2, **kwargs)
  with np.load(modelnet40.cache_path(str(tmp_path / 'one'), 'test')) as a:
    with np.load(modelnet40.cache_path(str(tmp_path / 'two'), 'test')) as b:
      np.testing.assert_array_equal(a['points'], b['points'])


def test_fixture_script_reproduces_the_committed_fixture(tmp_path):
  make_modelnet40_fixture.main([f'--output_dir={tmp_path}'])
  count = 0
  for root, _, files in os.walk(FIXTURE):
    for name in files:
      committed = os.path.join(root, name)
      rebuilt = os.path.join(tmp_path, os.path.relpath(committed, FIXTURE))
      if name.endswith('.h5'):  # Bytes may vary with the HDF5 version.
        with h5py.File(committed, 'r') as f, h5py.File(rebuilt, 'r') as g:
          assert sorted(f) == sorted(g) == ['data', 'label']
          for key in f:
            np.testing.assert_array_equal(f[key][()], g[key][()])
      else:
        with open(committed, 'rb') as f, open(rebuilt, 'rb') as g:
          assert f.read() == g.read(), committed
      count += 1
  assert count == 5 * 28 + 6


@pytest.mark.parametrize('damage', ['truncate', 'flip'])
def test_damaged_cache_npz_names_the_file(tmp_path, damage):
  """Issue 27: a truncated or overwritten train.npz, not a bare BadZipFile."""
  _write(tmp_path / 'shape_names.txt', 'a\nb\n')
  path = modelnet40.cache_path(str(tmp_path), 'train')
  np.savez(path, points=np.ones([4, 8, 3], np.float32),
           label=np.array([0, 1, 0, 1], np.int32))
  points, _ = modelnet40.read_cache_split(str(tmp_path), 'train')
  assert points.shape == (4, 8, 3)
  data = bytearray(open(path, 'rb').read())
  if damage == 'truncate':
    data = data[:len(data) // 2]
  else:
    data[len(data) // 4] ^= 0xff  # Inside the points array: a CRC error.
  with open(path, 'wb') as f:
    f.write(bytes(data))
  with pytest.raises(ValueError, match='is truncated or corrupt') as info:
    modelnet40.read_cache_split(str(tmp_path), 'train')
  assert path in str(info.value)
