"""ImageNet and permuted ImageNet end to end: jaxline train, checkpoint, eval.

Runs the classification experiment of configs/imagenet.py:debug and
configs/imagenet_permuted.py:pos=learned,debug on the tiny ILSVRC-2012 that
tests/data/ilsvrc_fixture.py builds with the real tfds builder (30 training
and 10 validation photographs), over the 8 fake CPU devices of conftest.py.
"""

import hashlib
import os
import subprocess
import sys

from absl import flags
import haiku as hk
import jax
from ml_collections import config_flags
import numpy as np
import pytest

from configs import imagenet as imagenet_config
from configs import imagenet_permuted
import experiments
from experiments import classification
from perceiver_jax import models
from perceiver_jax.data import imagenet as imagenet_data
from perceiver_jax.modules import preprocessors
from perceiver_jax.training import checkpointing
from perceiver_jax.training import jaxline_compat
from tests import helpers
from tests import test_configs
from tests.data import ilsvrc_fixture

jaxline = jaxline_compat.import_jaxline()
imagenet_fixture = ilsvrc_fixture.imagenet_fixture
_load_config = test_configs._load  # pylint: disable=protected-access

# Eval batch 16 = 8 devices x 2 does not divide the 10 validation images:
# one batch, 6 of its rows masked padding.
_EVAL_BATCH = 16


def _config(fixture, checkpoint_dir, name, arg, steps):
  """The debug config reading the fixture, saving every 2 steps."""
  config = _load_config(name, arg)
  config.checkpoint_dir = str(checkpoint_dir)
  config.training_steps = steps
  config.save_checkpoint_interval = 2
  config.log_tensors_interval = 1
  data = config.experiment_kwargs.config.data
  data.data_dir = fixture.data_dir
  data.deterministic = True
  data.threadpool_size = 2  # Few threads on a small CI machine.
  data.shuffle_buffer = 64
  config.experiment_kwargs.config.evaluation.batch_size = _EVAL_BATCH
  return config


def _train_and_evaluate(config):
  """jaxline training with the disk checkpointer, then the saved checkpoint
  evaluated; returns (restored checkpoint, eval metrics)."""
  checkpointer = checkpointing.make_checkpointer(config, 'train')
  jaxline.train.train(classification.ClassificationExperiment, config,
                      checkpointer, writer=None)
  restored = checkpointing.restore_checkpoint(config.checkpoint_dir)
  results = experiments.evaluate_checkpoint(config, config.checkpoint_dir)
  return restored, results


def _check_eval(results, fixture, steps):
  assert results['step'] == steps
  assert results['split'] == 'validation'
  # Every validation image exactly once; the 6 padding rows are masked.
  assert results['num_examples'] == fixture.num_val == 10
  assert np.isfinite(results['loss'])
  # A 1000-way classifier a few steps from initialisation: loss near
  # log(1000) = 6.9.
  assert 3.0 < results['loss'] < 12.0
  assert 0.0 <= results['top_1_acc'] <= results['top_5_acc'] <= 1.0


def test_imagenet_debug_trains_and_evaluates(imagenet_fixture, tmp_path):
  config = _config(imagenet_fixture, tmp_path, 'imagenet.py', 'debug',
                   steps=3)
  data = config.experiment_kwargs.config.data
  assert data.image_size == 16
  data.tfds_version = imagenet_data.prepared_versions(
      imagenet_fixture.data_dir)[0]
  data.eval_crop_fraction = 1.0
  restored, results = _train_and_evaluate(config)
  assert int(restored['global_step']) == 3
  params = restored['experiment_module']['params']
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  _check_eval(results, imagenet_fixture, steps=3)


def test_permuted_learned_trains_and_evaluates(imagenet_fixture, tmp_path):
  config = _config(imagenet_fixture, tmp_path, 'imagenet_permuted.py',
                   'pos=learned,debug', steps=2)
  model = config.experiment_kwargs.config.model
  assert model.preprocessor.permutation_seed == (
      imagenet_permuted.PERMUTATION_SEED)
  assert model.preprocessor.position_encoding_type == 'learned'
  restored, results = _train_and_evaluate(config)
  assert int(restored['global_step']) == 2
  params = restored['experiment_module']['params']
  # The learned position encoding is trained and checkpointed: [M, P].
  pos = params['preprocessor/position_encoding']['pos_embs']
  assert pos.shape == (16 * 16, model.preprocessor.learned_pos_channels)
  _check_eval(results, imagenet_fixture, steps=2)


def test_config_data_section_covers_the_loader_fields():
  """Every field the loader reads is in the config (so a command line can
  override it), with the loader's default."""
  config = imagenet_config.get_config()
  data = config.experiment_kwargs.config.data
  defaults = imagenet_data.default_config()
  assert set(defaults) <= set(data)
  for key in defaults:
    assert data[key] == defaults[key], key
  data.tfds_version = '5.0.0'  # Locked config: known fields still settable.
  data.eval_crop_fraction = 0.9
  data.threadpool_size = 0
  with pytest.raises(AttributeError):
    data.thredpool_size = 8


def test_new_data_fields_override_from_the_command_line():
  prefix = '--config.experiment_kwargs.config.data.'
  argv = [
      'train.py',
      '--config=' + os.path.join(helpers.ROOT, 'configs',
                                 'imagenet_permuted.py') + ':pos=learned,debug',
      prefix + 'tfds_version=5.0.0', prefix + 'eval_crop_fraction=0.9',
      prefix + 'threadpool_size=4', prefix + 'randaugment_magnitude=7']
  flag_values = flags.FlagValues()
  # sys_argv: the overrides are read from it (default: sys.argv).
  config_flags.DEFINE_config_file('config', flag_values=flag_values,
                                  sys_argv=argv)
  flag_values(argv)
  data = flag_values.config.experiment_kwargs.config.data
  assert data.tfds_version == '5.0.0'
  assert data.eval_crop_fraction == 0.9
  assert data.threadpool_size == 4
  assert data.randaugment_magnitude == 7.0


_PRINT_PERMUTATIONS = r"""
import hashlib, sys
import jax
if sys.argv[1] == 'other_host':
  # Pretend to be host 3 of 4: the permutation must not depend on it.
  jax.process_index = lambda *a, **k: 3
  jax.process_count = lambda *a, **k: 4
from configs import imagenet_permuted
from perceiver_jax.modules import preprocessors
for m in (16 * 16, 224 * 224):
  perm = preprocessors.make_permutation(m, imagenet_permuted.PERMUTATION_SEED)
  print(m, hashlib.sha256(perm.tobytes()).hexdigest())
"""


def _digest(perm):
  return hashlib.sha256(perm.tobytes()).hexdigest()


def _permutation_digests(role):
  return subprocess.Popen(
      [sys.executable, '-c', _PRINT_PERMUTATIONS, role], cwd=helpers.ROOT,
      env=dict(os.environ, JAX_PLATFORMS='cpu'), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def test_permutation_is_the_same_in_every_process_and_host():
  procs = [_permutation_digests(role) for role in ('host_0', 'other_host')]
  outputs = []
  for proc in procs:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    outputs.append(out)
  seed = imagenet_permuted.PERMUTATION_SEED
  here = ''.join(
      f'{m} {_digest(preprocessors.make_permutation(m, seed))}\n'
      for m in (16 * 16, 224 * 224))
  assert outputs[0] == outputs[1] == here
  perm = preprocessors.make_permutation(16 * 16, seed)
  assert perm.dtype == np.int32
  np.testing.assert_array_equal(np.sort(perm), np.arange(16 * 16))
  assert not np.array_equal(perm, np.arange(16 * 16))
  # Pinned: if a NumPy release changed default_rng's stream, a checkpoint
  # trained under one permutation would be evaluated under another.
  np.testing.assert_array_equal(perm[:8], [94, 48, 171, 8, 61, 37, 102, 151])


@pytest.mark.parametrize('arg', ['pos=learned,debug', 'pos=fourier,debug'])
def test_permuted_preprocessor_is_the_plain_one_indexed(arg):
  """Permuted output == unpermuted output [:, make_permutation(M, seed)]."""
  config = _load_config('imagenet_permuted.py', arg)
  section = config.experiment_kwargs.config.model.preprocessor
  plain = section.copy_and_resolve_references()
  with plain.unlocked():
    plain.permutation_seed = None

  def transform(sec):
    return hk.transform(lambda x: models.build_preprocessor(
        sec, name='preprocessor')(x, is_training=False))

  images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(
      np.float32)
  permuted_fn, plain_fn = transform(section), transform(plain)
  params = permuted_fn.init(jax.random.PRNGKey(0), images)
  # The same parameters (learned positions) serve both.
  assert jax.tree.structure(params) == jax.tree.structure(
      plain_fn.init(jax.random.PRNGKey(0), images))
  permuted, _ = permuted_fn.apply(params, None, images)
  unpermuted, _ = plain_fn.apply(params, None, images)
  perm = preprocessors.make_permutation(16 * 16,
                                        imagenet_permuted.PERMUTATION_SEED)
  assert permuted.shape == unpermuted.shape
  assert unpermuted.shape[:2] == (2, 16 * 16)
  np.testing.assert_array_equal(np.asarray(permuted),
                                np.asarray(unpermuted)[:, perm])
