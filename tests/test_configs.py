"""Every config and preset loads, is locked, and rejects typos."""

import glob
import os

import ml_collections
from ml_collections import config_flags
import pytest

from tests import helpers


PRESETS = {
    'digits.py': [None, 'permuted', 'debug', 'permuted,debug,seed=3',
                  'pos=learned', 'pos=learned,permuted,debug',
                  'baseline=resnet', 'baseline=resnet_ff',
                  'baseline=vit_ff', 'baseline=transformer_ff',
                  'baseline=vit_ff,permuted,seed=2',
                  'baseline=resnet,permuted,debug'],
    'imagenet.py': [None, 'one_cross', 'unshared', 'p2', 'p2,prep=conv',
                    'p2,pos=learned', 'p2,prep=conv,debug',
                    'p2,pos=learned,debug', 'bench_a', 'bench_b', 'debug',
                    'baseline=resnet50', 'baseline=resnet50_ff',
                    'baseline=vit_b16', 'baseline=vit_b16_ff',
                    'baseline=transformer_64_ff', 'baseline=vit_b16,debug'],
    'imagenet_permuted.py': [None, 'pos=fourier', 'pos=learned',
                             'pos=learned,debug', 'baseline=resnet50',
                             'baseline=resnet50_ff', 'baseline=vit_b16',
                             'baseline=vit_b16_ff',
                             'baseline=transformer_64_ff',
                             'baseline=resnet50_ff,debug'],
    'audioset.py': [None, 'modality=audio', 'modality=video',
                    'modality=audio_video', 'modality=audio,audio=mel',
                    'modality=audio_video,audio=mel', 'p2', 'debug',
                    'modality=audio_video,debug'],
    'modelnet40.py': [None, 'debug', 'fixture', 'fixture,seed=2',
                      'baseline=resnet50_ff', 'baseline=vit_b2_ff',
                      'baseline=transformer_44_ff',
                      'baseline=vit_b2_ff,debug,seed=1'],
}


def _load(name, arg):
  path = os.path.join(helpers.ROOT, 'configs', name)
  module = config_flags.config_flags._LoadConfigModule(name, path)  # pylint: disable=protected-access
  return module.get_config(arg)


def test_every_config_file_is_listed():
  files = {os.path.basename(p) for p in glob.glob(
      os.path.join(helpers.ROOT, 'configs', '*.py'))}
  assert files - {'__init__.py', 'common.py'} == set(PRESETS)


@pytest.mark.parametrize('name, arg', [
    (name, arg) for name, args in PRESETS.items() for arg in args])
def test_config_loads_locked(name, arg):
  config = _load(name, arg)
  assert isinstance(config, ml_collections.ConfigDict)
  assert config.is_locked
  exp = config.experiment_kwargs.config
  for section in ('data', 'model', 'optimizer', 'training', 'evaluation'):
    assert section in exp
  assert exp.training.total_steps == config.training_steps
  with pytest.raises(AttributeError):
    exp.model.encoder.num_latentz = 3  # A typo must not pass silently.


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_unknown_preset_is_an_error(name):
  with pytest.raises(ValueError, match='Unknown config option'):
    _load(name, 'no_such_preset')


@pytest.mark.parametrize('arg, match', [
    ('prep=conv', 'use them with p2'),
    ('pos=learned', 'use them with p2'),
    ('p2,prep=conv,pos=learned', 'No released model'),
    ('p2,prep=patches', "prep must be 'pixels' or 'conv'"),
    ('p2,pos=sine', "pos must be 'fourier' or 'learned'"),
])
def test_imagenet_released_variants_are_checked(arg, match):
  with pytest.raises(ValueError, match=match):
    _load('imagenet.py', arg)


@pytest.mark.parametrize('name, arg, match', [
    ('digits.py', 'baseline=resnet50', 'Unknown baseline'),
    ('digits.py', 'baseline=vit_ff,pos=learned', 'baselines set their own'),
    ('digits.py', 'pos=sine', "pos must be 'fourier' or 'learned'"),
    ('imagenet.py', 'baseline=vit', 'Unknown baseline'),
    ('imagenet.py', 'baseline=vit_b16,p2', 'excludes the Perceiver presets'),
    ('imagenet.py', 'baseline=resnet50,one_cross', 'excludes'),
    ('imagenet_permuted.py', 'baseline=resnet50_ff,pos=learned', 'excludes'),
    ('modelnet40.py', 'baseline=vit_b16', 'Unknown baseline'),
    ('modelnet40.py', 'baseline=resnet50_ff,fixture', 'not with fixture'),
])
def test_baseline_presets_are_checked(name, arg, match):
  with pytest.raises(ValueError, match=match):
    _load(name, arg)


@pytest.mark.parametrize('name, arg, kind, channels, permuted, image_size', [
    ('digits.py', 'baseline=resnet', 'resnet', 'none', False, 8),
    ('digits.py', 'baseline=resnet_ff,permuted', 'resnet', 'fourier', True,
     8),
    ('digits.py', 'baseline=vit_ff', 'vit', 'fourier', False, 8),
    ('digits.py', 'baseline=transformer_ff', 'transformer', 'fourier', False,
     8),
    ('imagenet.py', 'baseline=resnet50', 'resnet', 'none', False, 224),
    ('imagenet.py', 'baseline=vit_b16_ff', 'vit', 'fourier', False, 224),
    ('imagenet_permuted.py', 'baseline=resnet50_ff', 'resnet', 'fourier',
     True, 224),
    ('imagenet_permuted.py', 'baseline=transformer_64_ff', 'transformer',
     'fourier', True, 64),
])
def test_baseline_presets_select_model_and_pipeline(name, arg, kind, channels,
                                                    permuted, image_size):
  config = _load(name, arg)
  exp = config.experiment_kwargs.config
  assert exp.model.type == kind
  pre = exp.model.preprocessor
  assert (pre.type, pre.prep_type) == ('image', 'pixels')
  assert pre.position_encoding_type == channels
  assert (pre.permutation_seed is not None) == permuted
  assert tuple(exp.data.input_shape[:2]) == (image_size, image_size)
  assert tuple(pre.max_resolution) == (image_size, image_size)
  assert exp.model.network.num_classes == exp.data.num_classes
  # The Perceiver's training recipe, a checkpoint directory of its own.
  base = _load(name, 'permuted' if name == 'digits.py' and permuted else None)
  assert exp.optimizer.to_dict() == (
      base.experiment_kwargs.config.optimizer.to_dict())
  assert config.checkpoint_dir != base.checkpoint_dir


def test_digits_learned_positions_use_one_cross_attend():
  model = _load('digits.py', 'pos=learned').experiment_kwargs.config.model
  assert model.preprocessor.position_encoding_type == 'learned'
  assert model.encoder.num_cross_attends == 1
  assert 'type' not in model  # A Perceiver.


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_every_config_has_init_checkpoint(name):
  training = _load(name, None).experiment_kwargs.config.training
  assert training.init_checkpoint is None
  training.init_checkpoint = '/some/checkpoint'  # A str field.


def test_overrides_follow_references():
  config = _load('digits.py', None)
  config.training_steps = 7
  assert config.experiment_kwargs.config.training.total_steps == 7


# training_steps and training.total_steps (issue 27): overriding either is
# honoured, in either order, as scripts/train.py parses the flags.


def _parse_overrides(*overrides):
  from absl import flags  # pylint: disable=g-import-not-at-top
  path = os.path.join(helpers.ROOT, 'configs', 'digits.py')
  argv = ['train.py', f'--config={path}:debug', *overrides]
  flag_values = flags.FlagValues()
  # The override flags (--config.x) are found in argv when defined.
  config_flags.DEFINE_config_file('config', flag_values=flag_values,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize('overrides, training_steps, total_steps', [
    ([], 20, 20),
    (['--config.training_steps=50'], 50, 50),
    (['--config.experiment_kwargs.config.training.total_steps=1000'], 20,
     1000),
    (['--config.training_steps=20',
      '--config.experiment_kwargs.config.training.total_steps=1000'], 20,
     1000),
    (['--config.experiment_kwargs.config.training.total_steps=1000',
      '--config.training_steps=20'], 20, 1000),
    (['--config.training_steps=30',
      '--config.experiment_kwargs.config.training.total_steps=30'], 30, 30),
])
def test_training_steps_and_total_steps_overrides_are_both_honoured(
    overrides, training_steps, total_steps):
  config = _parse_overrides(*overrides)
  assert config.training_steps == training_steps
  assert config.experiment_kwargs.config.training.total_steps == total_steps


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_total_steps_follows_training_steps_one_way(name):
  config = _load(name, None)
  training = config.experiment_kwargs.config.training
  assert training.max_nonfinite_steps == 0
  config.training_steps = 11
  assert training.total_steps == 11
  training.total_steps = 500
  assert (config.training_steps, training.total_steps) == (11, 500)
  config.training_steps = 12  # total_steps, set itself, stays.
  assert training.total_steps == 500


@pytest.mark.parametrize('baseline, kind, grid', [
    ('resnet50_ff', 'resnet', (44, 44)), ('vit_b2_ff', 'vit', (44, 44)),
    ('transformer_44_ff', 'transformer', None)])
def test_modelnet40_baselines_read_44x44_points(baseline, kind, grid):
  config = _load('modelnet40.py', f'baseline={baseline}')
  exp = config.experiment_kwargs.config
  base = _load('modelnet40.py', None).experiment_kwargs.config
  assert exp.model.type == kind
  assert exp.model.get('grid') == grid
  assert exp.data.num_points == 44 * 44
  assert tuple(exp.data.input_shape) == (44 * 44, 3)
  # The Perceiver's Fourier features and training recipe.
  assert exp.model.preprocessor.to_dict() == base.model.preprocessor.to_dict()
  assert exp.optimizer.to_dict() == base.optimizer.to_dict()
  assert exp.model.network.num_classes == exp.data.num_classes == 40
  if kind == 'vit':
    assert exp.model.network.patch_size == 2
  assert config.checkpoint_dir != _load('modelnet40.py', None).checkpoint_dir
