"""Every config and preset loads, is locked, and rejects typos."""

import glob
import os

import ml_collections
from ml_collections import config_flags
import pytest

from tests import helpers


PRESETS = {
    'digits.py': [None, 'permuted', 'debug', 'permuted,debug,seed=3'],
    'imagenet.py': [None, 'one_cross', 'unshared', 'p2', 'p2,prep=conv',
                    'p2,pos=learned', 'p2,prep=conv,debug',
                    'p2,pos=learned,debug', 'bench_a', 'bench_b', 'debug'],
    'imagenet_permuted.py': [None, 'pos=fourier', 'pos=learned',
                             'pos=learned,debug'],
    'audioset.py': [None, 'modality=audio', 'modality=video',
                    'modality=audio_video', 'modality=audio,audio=mel',
                    'modality=audio_video,audio=mel', 'p2', 'debug',
                    'modality=audio_video,debug'],
    'modelnet40.py': [None, 'debug', 'fixture', 'fixture,seed=2'],
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


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_every_config_has_init_checkpoint(name):
  training = _load(name, None).experiment_kwargs.config.training
  assert training.init_checkpoint is None
  training.init_checkpoint = '/some/checkpoint'  # A str field.


def test_overrides_follow_references():
  config = _load('digits.py', None)
  config.training_steps = 7
  assert config.experiment_kwargs.config.training.total_steps == 7
