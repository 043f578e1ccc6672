"""The config record: saved with every checkpoint, checked on resume."""

import json

from jaxline import base_config
import pytest

from perceiver_jax.training import checkpointing
from perceiver_jax.training import config_record
from tests.training import test_checkpointing as helpers


def test_trajectory_changes_are_listed_and_harmless_ones_are_not():
  saved = {'random_seed': 0, 'save_checkpoint_interval': 100,
           'experiment_kwargs': {'config': {
               'optimizer': {'base_lr': 1e-3},
               'evaluation': {'batch_size': 8}}}}
  current = {'random_seed': 1, 'save_checkpoint_interval': 5,
             'experiment_kwargs': {'config': {
                 'optimizer': {'base_lr': 1e-3, 'warmup_steps': 10},
                 'evaluation': {'batch_size': 64}}}}
  assert config_record.trajectory_diff(saved, current) == [
      "experiment_kwargs.config.optimizer.warmup_steps: '<absent>' -> 10",
      'random_seed: 0 -> 1']


def test_resume_with_a_changed_seed_is_refused_unless_allowed(tmp_path):
  config = helpers._config(tmp_path, random_seed=0)
  helpers._save(checkpointing.make_checkpointer(config, 'train'), 2)
  recorded = json.loads((tmp_path / 'latest' / '2' / 'meta' / 'metadata'
                         ).read_text())['config']
  assert recorded == config_record.resolved(config)  # With every step.
  assert json.loads((tmp_path / 'config.json').read_text()) == recorded

  # Harmless changes (intervals, logging) resume silently.
  helpers._fresh_state(resumer := checkpointing.make_checkpointer(
      helpers._config(tmp_path, random_seed=0, save_checkpoint_interval=7,
                      log_tensors_interval=3), 'train'))
  resumer.restore('latest')

  changed = helpers._config(tmp_path, random_seed=1)
  state = helpers._fresh_state(
      refuser := checkpointing.make_checkpointer(changed, 'train'))
  with pytest.raises(config_record.ConfigChangeError,
                     match=r'latest/2 was trained with another config.*'
                     r'random_seed: 0 -> 1.*--allow_config_change'):
    refuser.restore('latest')
  assert state.global_step == 0  # Nothing was loaded.

  changed.checkpoint_allow_config_change = True
  state = helpers._fresh_state(
      allowed := checkpointing.make_checkpointer(changed, 'train'))
  allowed.restore('latest')
  assert state.global_step == 2
  # config.json now describes the run that continues.
  assert json.loads((tmp_path / 'config.json').read_text())[
      'random_seed'] == 1


def test_an_eval_checkpointer_does_not_check_or_write_the_config(tmp_path):
  helpers._save(checkpointing.make_checkpointer(
      helpers._config(tmp_path / 'a'), 'train'), 2)
  config = base_config.get_base_config()
  config.checkpoint_dir = str(tmp_path / 'a')
  config.random_seed = 5
  evaluator = checkpointing.make_checkpointer(config, 'eval')
  helpers._fresh_state(evaluator)
  evaluator.restore('latest')
  assert json.loads((tmp_path / 'a' / 'config.json').read_text())[
      'random_seed'] == 42
