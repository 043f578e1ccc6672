"""perceiver_jax.analysis.attention_maps and scripts/attention_maps.py."""

import json
import os
import subprocess
import sys

from etils import epath
import haiku as hk
import jax
import ml_collections
import numpy as np
import optax
from PIL import Image
import pytest

from configs import audioset as audioset_config
from configs import digits as digits_config
from configs import imagenet as imagenet_config
from perceiver_jax import classify
from perceiver_jax import models
from perceiver_jax.analysis import attention_maps
from perceiver_jax.data import digits
from perceiver_jax.modules import attention
from perceiver_jax.modules import preprocessors
from perceiver_jax.ops import byte_array
from perceiver_jax.training import checkpointing
from perceiver_jax.training import losses
from perceiver_jax.training import tree_io
from tests import helpers


def _digit_png(path) -> np.ndarray:
  """The first digits test image as an 8 x 8 greyscale PNG; its pixels."""
  image = digits._split_arrays()['test'][0][0]  # pylint: disable=protected-access
  Image.fromarray((image[..., 0] * 255).round().astype(np.uint8)).save(path)
  return np.asarray(Image.open(path), np.float32)[..., None] / 255


def _init(model, image):
  return models.make_forward_with_state(model).init(
      jax.random.key(3), image[None], is_training=True)


class _Snapshot:
  """What tree_io.write_step saves: an experiment's snapshot_state()."""

  def __init__(self, state):
    self._state = state

  def snapshot_state(self):
    return self._state


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A digits debug model trained for a few Adam steps, as a checkpoint.

  Written as the experiment writes its snapshot (tree_io.write_step), without
  jaxline's pmapped loop, to stay cheap.
  """
  tmp = tmp_path_factory.mktemp('attention_maps')
  config = digits_config.get_config('debug')
  model = config.experiment_kwargs.config.model
  images, labels = digits._split_arrays()['train']  # pylint: disable=protected-access
  images, labels = images[:64], labels[:64]
  forward = models.make_forward(model)
  params = forward.init(jax.random.key(0), images, is_training=True)
  optimizer = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state):
    loss = lambda p: losses.softmax_cross_entropy(
        forward.apply(p, None, images, is_training=True), labels).mean()
    grads = jax.grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = optimizer.init(params)
  for _ in range(5):
    params, opt_state = step(params, opt_state)
  state = ml_collections.ConfigDict()
  state.global_step = 5
  state.experiment_module = _Snapshot({'params': params, 'opt_state': ()})
  writer = tree_io.orbax_checkpointer(all_processes=False)
  try:
    tree_io.write_step(epath.Path(tmp / 'ckpt') / checkpointing.LATEST / '5',
                       state, writer)
  finally:
    writer.close()
  image = _digit_png(tmp / 'digit.png')
  return config, str(tmp / 'ckpt'), str(tmp / 'digit.png'), image


def _attention_outputs(model, params, state, image):
  """Each encoder cross-attention's (inputs, output), recorded in the model."""

  def forward(x):
    records = []

    def record(next_f, args, kwargs, context):
      out = next_f(*args, **kwargs)
      if (context.method_name == '__call__' and
          isinstance(context.module, attention.Attention) and
          context.module.module_name.startswith('encoder/~/cross_attend_')):
        records.append((context.module.module_name, kwargs['prepared'], out))
      return out

    with hk.intercept_methods(record):
      models.build_model(model)(x, is_training=False)
    return records

  records, _ = hk.transform_with_state(forward).apply(
      params, state, None, image[None])
  return records


def test_maps_are_the_models_own_attention(trained):
  config, ckpt, _, image = trained
  model = config.experiment_kwargs.config.model
  snapshot = checkpointing.restore_checkpoint(ckpt)['experiment_module']
  params = snapshot['params']
  maps = attention_maps.attention_maps(model, params, {}, image[None])
  assert len(maps) == model.encoder.num_cross_attends == 2
  n = model.encoder.num_latents
  for m in maps:
    assert m.shape == (1, 1, n, 8, 8) and m.dtype == np.float32
    np.testing.assert_allclose(m.sum((-2, -1)), 1.0, atol=1e-5)
    assert np.all(m >= 0)
  # Weights x values, through the output projection, give what each
  # cross-attention of the model returned (so these are its weights).
  records = _attention_outputs(model, params, {}, image)
  assert len(records) == 2
  assert records[0][0].endswith('cross_attend_0/~/attention')
  assert records[1][0].endswith('cross_attend_1/~/attention')
  for m, (name, prepared, out) in zip(maps, records):
    x = np.asarray(byte_array.dense(prepared['inputs']))  # LN'd, no affine.
    scale, offset = prepared['affine']
    x = x * scale + offset
    value, output = params[f'{name}/~/value'], params[f'{name}/~/output']
    v = x @ value['w'] + value['b']  # [1, M, V]
    want = (m[0, 0].reshape(n, 64) @ v[0]) @ output['w'] + output['b']
    np.testing.assert_allclose(want, np.asarray(out)[0], rtol=2e-4, atol=2e-5)
  # The two cross-attends see different latents: different maps.
  assert not np.allclose(maps[0], maps[1], atol=1e-4)


def test_a_permuted_model_gives_maps_on_the_image_grid(trained):
  config, ckpt, _, image = trained
  params = checkpointing.restore_checkpoint(ckpt)['experiment_module'][
      'params']
  plain = config.experiment_kwargs.config.model
  permuted = digits_config.get_config('debug,permuted').experiment_kwargs
  permuted = permuted.config.model
  seed = permuted.preprocessor.permutation_seed
  assert seed is not None and plain.preprocessor.permutation_seed is None
  got = attention_maps.attention_maps(permuted, params, {}, image[None])
  want = attention_maps.attention_maps(plain, params, {}, image[None])
  # Fourier features travel with their pixels: the same attention per pixel.
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5)
  # Left in byte array order, the maps would be scrambled.
  perm = preprocessors.make_permutation(64, seed)
  scrambled = want[0].reshape(want[0].shape[:-2] + (64,))[..., perm]
  assert not np.allclose(scrambled, got[0].reshape(scrambled.shape),
                         atol=1e-3)


def test_p2_one_cross_attend_with_random_params(tmp_path):
  config = imagenet_config.get_config('p2,debug')
  model = config.experiment_kwargs.config.model
  with model.unlocked():
    model.encoder.num_latents = 6
  image = np.random.default_rng(0).normal(size=[16, 16, 3]).astype(np.float32)
  params, state = _init(model, image)
  maps = attention_maps.attention_maps(model, params, state,
                                       np.stack([image, -image]))
  assert len(maps) == 1  # The decoder's cross-attention is not the encoder's.
  assert maps[0].shape == (2, 1, 6, 16, 16)
  np.testing.assert_allclose(maps[0].sum((-2, -1)), 1.0, atol=1e-5)
  assert not np.allclose(maps[0][0], maps[0][1])  # Per image.
  listing = attention_maps.render([maps[0][:1]], image, str(tmp_path),
                                  latents=[0, 5])
  assert listing['latents'] == [0, 5] and listing['grid'] == [16, 16]
  grid = np.asarray(Image.open(tmp_path / 'cross_attend_0_latents.png'))
  assert grid.shape == (48, 2 * 48 + 2, 3)


def test_conv_preprocessing_with_batch_norm_state():
  # The released conv model: 4x downsampled grid, BatchNorm moving averages.
  model = imagenet_config.get_config(
      'p2,prep=conv,debug').experiment_kwargs.config.model
  image = np.random.default_rng(1).normal(size=[16, 16, 3]).astype(np.float32)
  params, state = _init(model, image)
  assert state  # BatchNorm's averages.
  [maps] = attention_maps.attention_maps(model, params, state, image[None])
  assert maps.shape == (1, 1, model.encoder.num_latents, 4, 4)
  np.testing.assert_allclose(maps.sum((-2, -1)), 1.0, atol=1e-5)


def test_grid_and_latent_choice():
  assert attention_maps.grid_shape((224, 224, 3), 56 * 56) == (56, 56)
  assert attention_maps.grid_shape((32, 48, 3), 4 * 6) == (4, 6)
  assert attention_maps.grid_shape((8, 8, 1), 64) == (8, 8)
  with pytest.raises(ValueError, match='7 byte array positions'):
    attention_maps.grid_shape((8, 8, 1), 7)
  assert attention_maps.choose_latents(8) == list(range(8))
  chosen = attention_maps.choose_latents(512)
  assert len(chosen) == attention_maps.MAX_GRID_LATENTS
  assert chosen[0] == 0 and chosen[-1] == 511
  with pytest.raises(ValueError, match=r'\[0, 8\); bad: \[8\]'):
    attention_maps.choose_latents(8, [1, 8])


def test_bad_inputs_are_named(trained, tmp_path):
  config, ckpt, png, _ = trained
  out = str(tmp_path / 'out')
  with pytest.raises(FileNotFoundError, match='nothere.png'):
    attention_maps.write_attention_maps(config, ckpt,
                                        str(tmp_path / 'nothere.png'), out)
  (tmp_path / 'junk.png').write_bytes(b'\x89PNG not really')
  with pytest.raises(ValueError, match='Cannot decode .*junk.png'):
    attention_maps.write_attention_maps(config, ckpt,
                                        str(tmp_path / 'junk.png'), out)
  with pytest.raises(ValueError, match="has preprocessor type 'multimodal'"):
    attention_maps.write_attention_maps(
        audioset_config.get_config('debug'), ckpt, 'x.wav', out)
  with pytest.raises(classify.CheckpointMismatch, match='missing'):
    attention_maps.write_attention_maps(
        imagenet_config.get_config('p2,debug'), ckpt, png, out)
  with pytest.raises(FileNotFoundError, match='No complete checkpoint'):
    attention_maps.write_attention_maps(config, str(tmp_path), png, out)
  assert not os.path.exists(out)


def test_script_writes_the_pngs(trained, tmp_path):
  config, ckpt, png, image = trained
  out = tmp_path / 'maps'
  env = helpers.environ_without_malloc_settings(
      JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='', XLA_FLAGS='')
  run = subprocess.run(
      [sys.executable, os.path.join(helpers.ROOT, 'scripts',
                                    'attention_maps.py'),
       f'--config={os.path.join(helpers.ROOT, "configs", "digits.py")}:debug',
       f'--checkpoint={ckpt}', f'--image={png}', f'--out={out}',
       '--latents=0,2,4,6'],
      capture_output=True, text=True, env=env, cwd=helpers.ROOT, timeout=300,
      check=False)
  assert run.returncode == 0, run.stderr
  listing = json.loads(run.stdout.splitlines()[-1])
  with open(out / 'maps.json') as f:
    assert json.load(f)['files'] == listing['files']
  assert listing['num_cross_attends'] == 2 and listing['latents'] == [0, 2, 4,
                                                                        6]
  for k in range(2):
    assert f'cross_attend_{k}_latents.png' in listing['files']
    assert f'cross_attend_{k}_mean.png' in listing['files']
  for name in listing['files']:
    assert (out / name).stat().st_size > 0
  grid = np.asarray(Image.open(out / 'cross_attend_0_latents.png'))
  assert grid.shape == (2 * 48 + 2, 2 * 48 + 2, 3)  # 4 latents, 2 x 2.
  mean = np.asarray(Image.open(out / 'cross_attend_1_mean.png'))
  assert mean.shape == (128, 2 * 128 + 8, 3)  # Image | mean map.
  saved = np.load(out / 'attention.npz')
  params = checkpointing.restore_checkpoint(ckpt)['experiment_module'][
      'params']
  direct = attention_maps.attention_maps(
      config.experiment_kwargs.config.model, params, {}, image[None])
  for k in range(2):
    np.testing.assert_allclose(saved[f'cross_attend_{k}'], direct[k][0],
                               atol=1e-6)
