"""perceiver_jax.classify and scripts/classify.py on a tiny 1000-class P2."""

import io
import json
import os
import subprocess
import sys

from etils import epath
import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import digits as digits_config
from configs import imagenet as imagenet_config
from perceiver_jax import classify
from perceiver_jax import models
from perceiver_jax.data import imagenet
from perceiver_jax.data import imagenet_labels
from perceiver_jax.training import checkpointing
from perceiver_jax.training import tree_io

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PRESET = 'p2,debug'  # P2's structure (query decoder, 1000 classes), tiny.


class _Snapshot:
  """What tree_io.write_step saves: an experiment's snapshot_state()."""

  def __init__(self, state):
    self._state = state

  def snapshot_state(self):
    return self._state


def _write_checkpoint(root: epath.Path, config: ml_collections.ConfigDict,
                      step: int = 7, state_fn=None) -> None:
  """A project checkpoint (as the experiment writes) of random params.

  A model with state also saves 'state' (state_fn(state) if given).
  """
  exp = config.experiment_kwargs.config
  params, state = models.make_forward_with_state(exp.model).init(
      jax.random.key(1), np.zeros([1, *exp.data.input_shape], np.float32),
      is_training=True)
  snapshot = {'params': params, 'opt_state': ()}
  if state:
    snapshot['state'] = state_fn(state) if state_fn else state
  state = ml_collections.ConfigDict()
  state.global_step = step
  state.experiment_module = _Snapshot(snapshot)
  writer = tree_io.orbax_checkpointer(all_processes=False)
  try:
    tree_io.write_step(root / checkpointing.LATEST / str(step), state, writer)
  finally:
    writer.close()


def _logits(config, ckpt, image):
  """A direct forward pass of the checkpoint's model on one image."""
  snapshot = checkpointing.restore_checkpoint(ckpt)['experiment_module']
  forward = models.make_forward_with_state(
      config.experiment_kwargs.config.model)
  logits, _ = forward.apply(snapshot['params'], snapshot.get('state') or {},
                            None, image[None], is_training=False)
  return np.asarray(logits)[0]


def _image(height: int, width: int, fmt: str) -> bytes:
  rng = np.random.default_rng(height * width)
  pixels = rng.integers(0, 256, [height, width, 3], dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format=fmt)
  return out.getvalue()


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('classify')
  config = imagenet_config.get_config(_PRESET)
  _write_checkpoint(epath.Path(tmp / 'ckpt'), config)
  paths = []
  for name, shape, fmt in (('a.png', (20, 28), 'PNG'),
                           ('b.jpg', (40, 30), 'JPEG')):
    (tmp / name).write_bytes(_image(*shape, fmt))
    paths.append(str(tmp / name))
  return config, str(tmp / 'ckpt'), paths


def test_classify_equals_a_direct_forward_pass(setup):
  config, ckpt, paths = setup
  results = classify.classify(config, ckpt, paths)
  exp = config.experiment_kwargs.config
  names = imagenet_labels.class_names()
  assert [r['image'] for r in results] == paths
  for path, result in zip(paths, results):
    image = imagenet.load_eval_image(path, exp.data)
    assert image.shape == (16, 16, 3)
    logits = _logits(config, ckpt, image)
    assert logits.shape == (1000,)
    probs = np.asarray(jax.nn.softmax(logits))
    top = result['top_k']
    assert len(top) == 5
    np.testing.assert_array_equal([t['class'] for t in top],
                                  np.argsort(-probs, kind='stable')[:5])
    got = np.array([t['prob'] for t in top])
    np.testing.assert_allclose(got, probs[[t['class'] for t in top]],
                               rtol=1e-4)
    assert np.all(np.diff(got) <= 0) and got.sum() <= 1.0
    for t in top:
      assert t['name'] == names[t['class']] and t['name']
      assert t['id'] == imagenet_labels.synsets()[t['class']]
  # Different images, different predictions: the images reach the model.
  assert results[0]['top_k'] != results[1]['top_k']


def test_classify_uses_the_model_state(setup, tmp_path):
  # The released conv model's BatchNorm keeps moving averages as state.
  config = imagenet_config.get_config('p2,prep=conv,debug')
  _, _, paths = setup
  shift = lambda state: jax.tree.map(
      lambda v: v + 0.5 if np.issubdtype(v.dtype, np.floating) else v, state)
  _write_checkpoint(epath.Path(tmp_path), config, state_fn=shift)
  [result] = classify.classify(config, str(tmp_path), paths[:1], k=3)
  image = imagenet.load_eval_image(
      paths[0], config.experiment_kwargs.config.data)
  probs = np.asarray(jax.nn.softmax(_logits(config, str(tmp_path), image)))
  np.testing.assert_array_equal([t['class'] for t in result['top_k']],
                                np.argsort(-probs, kind='stable')[:3])
  np.testing.assert_allclose([t['prob'] for t in result['top_k']],
                             np.sort(probs)[::-1][:3], rtol=1e-4)


def test_classify_rejects_bad_inputs(setup, tmp_path):
  config, ckpt, paths = setup
  with pytest.raises(FileNotFoundError, match='nothere.jpg'):
    classify.classify(config, ckpt, [paths[0], str(tmp_path / 'nothere.jpg')])
  (tmp_path / 'junk.jpg').write_bytes(b'\xff\xd8 not really')
  with pytest.raises(ValueError, match='Cannot decode .*junk.jpg'):
    classify.classify(config, ckpt, [str(tmp_path / 'junk.jpg')])
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='No complete checkpoint'):
    classify.classify(config, str(tmp_path / 'empty'), paths)
  with pytest.raises(ValueError, match='No image files'):
    classify.classify(config, ckpt, [])
  with pytest.raises(ValueError, match='k=0'):
    classify.classify(config, ckpt, paths, k=0)
  with pytest.raises(ValueError, match="'digits' with 10 classes"):
    classify.classify(digits_config.get_config('debug'), ckpt, paths)
  # A checkpoint of another model (P1's average decoder, not P2's query).
  with pytest.raises(classify.CheckpointMismatch, match='missing'):
    classify.classify(imagenet_config.get_config('debug'), ckpt, paths)


def test_script_prints_one_json_line_per_image(setup):
  _, ckpt, paths = setup
  env = dict(os.environ, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='',
             XLA_FLAGS='')
  run = subprocess.run(
      [sys.executable, os.path.join(_ROOT, 'scripts', 'classify.py'),
       f'--config={os.path.join(_ROOT, "configs", "imagenet.py")}:{_PRESET}',
       f'--checkpoint={ckpt}', '--top_k=3', *paths],
      capture_output=True, text=True, env=env, cwd=_ROOT, timeout=300,
      check=False)
  assert run.returncode == 0, run.stderr
  lines = [json.loads(line) for line in run.stdout.splitlines()]
  assert [line['image'] for line in lines] == paths
  assert all(len(line['top_k']) == 3 and 'name' in line['top_k'][0]
             for line in lines)


def test_labels_are_tfds_imagenet2012_classes():
  path = tfds.core.tfds_path('datasets/imagenet2012/labels.txt')
  with open(os.fspath(path)) as f:
    assert imagenet_labels.synsets() == tuple(f.read().split())
  names = imagenet_labels.class_names()
  assert len(names) == len(set(names)) == imagenet_labels.NUM_CLASSES
  assert names[0] == 'tench, Tinca tinca'
  assert names[207] == 'golden retriever'
  assert names[251] == 'dalmatian, coach dog, carriage dog'
  assert names[999] == 'toilet tissue, toilet paper, bathroom tissue'


def test_top_k():
  logits = np.log(np.array([0.1, 0.4, 0.1, 0.4]))
  top = imagenet_labels.top_k(logits, 3, names=list('abcd'))
  assert [t['class'] for t in top] == [1, 3, 0]  # Ties: lower index first.
  assert [t['name'] for t in top] == ['b', 'd', 'a']
  np.testing.assert_allclose([t['prob'] for t in top], [0.4, 0.4, 0.1])
  assert 'id' not in top[0]
  with pytest.raises(ValueError, match='k=5'):
    imagenet_labels.top_k(logits, 5)
  with pytest.raises(ValueError, match=r'\[K\]'):
    imagenet_labels.top_k(logits[None], 1)
  with pytest.raises(ValueError, match='3 names for 4'):
    imagenet_labels.top_k(logits, 1, names=list('abc'))
