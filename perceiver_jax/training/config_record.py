"""The config a run was trained with: recorded, and checked on resume.

Every checkpoint's metadata holds the resolved config (`resolved`), and
`<checkpoint_dir>/config.json` holds the current run's, replacing the long
config dump in the log with a one-line pointer. Resuming compares the
restored step's config with the new one: a difference that changes the
trajectory (seed, optimizer and schedule, training_steps, batch size, model,
data, precision; any key not listed in `_HARMLESS` below) is refused with the
diff unless `config.checkpoint_allow_config_change` (scripts/train.py
--allow_config_change) is set. Keys that only change what is saved, logged or
evaluated, and when, are free to change.
"""

import json
import os
from typing import Any, Mapping

from etils import epath
import ml_collections

from perceiver_jax.training import checkpoint_integrity as integrity
from perceiver_jax.training import logs

_LOG = logs.get_logger(__name__)

CONFIG_FILE = 'config.json'

# Dotted keys (or prefixes ending in '.') that do not alter the trajectory.
_HARMLESS = (
    'checkpoint_dir', 'save_checkpoint_interval', 'checkpoint_interval_type',
    'max_checkpoints_to_keep', 'best_checkpoints_to_keep',
    'save_initial_train_checkpoint', 'train_checkpoint_all_hosts',
    'best_checkpoint_all_hosts', 'checkpoint_async', 'interval_type',
    'logging_interval_type',
    'log_tensors_interval', 'log_train_data_interval', 'log_async',
    'log_all_hosts', 'log_all_train_data', 'periodic_action_growth_ratios',
    'eval_initial_weights', 'one_off_evaluate', 'best_model_eval_metric',
    'best_model_eval_metric_higher_is_better', 'random_mode_eval',
    'checkpoint_allow_', 'distributed.', 'experiment_kwargs.config.evaluation.',
    'experiment_kwargs.config.data.eval_split',
    'experiment_kwargs.config.training.log_every_steps',
)


class ConfigChangeError(integrity.CheckpointError):
  """Resuming with a config that would change the training trajectory."""


def resolved(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as JSON-safe nested dicts, references resolved."""
  return json.loads(config.to_json_best_effort())


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, Mapping):
    flat = {}
    for key, value in tree.items():
      flat.update(_flatten(value, f'{prefix}{key}.'))
    return flat
  return {prefix[:-1]: tree}


def _harmless(key: str) -> bool:
  return any(key == h or (h.endswith(('.', '_')) and key.startswith(h))
             for h in _HARMLESS)


def trajectory_diff(saved: Mapping[str, Any],
                    current: Mapping[str, Any]) -> list[str]:
  """Lines 'key: saved -> current' for changes that alter the trajectory."""
  old, new = _flatten(saved), _flatten(current)
  missing = '<absent>'
  return [f'{key}: {old.get(key, missing)!r} -> {new.get(key, missing)!r}'
          for key in sorted(set(old) | set(new))
          if old.get(key, missing) != new.get(key, missing) and
          not _harmless(key)]


def check_resume(saved: Any, current: Mapping[str, Any], step_dir: Any,
                 allow_change: bool) -> None:
  """Refuses to resume from `step_dir` with a trajectory-changing config.

  Args:
    saved: the config recorded in the restored step (None for a step written
      before configs were recorded: a note is logged).
    current: `resolved()` of the new run's config.
    step_dir: the restored step, for messages.
    allow_change: log the diff as a warning instead of refusing.

  Raises:
    ConfigChangeError: listing the changed keys.
  """
  if saved is None:
    _LOG.info('Checkpoint %s records no config: resuming unchecked.',
              step_dir)
    return
  diff = trajectory_diff(saved, current)
  if not diff:
    return
  shown = '; '.join(diff[:10]) + (' ...' if len(diff) > 10 else '')
  if allow_change:
    _LOG.warning('Resuming %s with a changed config (allowed): %s', step_dir,
                 shown)
    return
  raise ConfigChangeError(
      f'Checkpoint {step_dir} was trained with another config; resuming '
      f'would change the run: {shown}. Use another checkpoint_dir, or pass '
      '--allow_config_change to continue anyway.')


def write_config_file(root: epath.Path, current: Mapping[str, Any]) -> None:
  """Writes `<root>/config.json` whole or not at all, and logs where it is.

  A local file goes through a renamed temporary. An object store's upload
  is already all-or-nothing, and a rename there is a copy and a delete
  (gcsfs first tries GCS's moveTo, retried for half a minute where a store
  lacks it), so gs:// and other URLs are written directly.
  """
  root.mkdir(parents=True, exist_ok=True)
  path = root / CONFIG_FILE
  text = json.dumps(current, indent=2, sort_keys=True)
  if '://' in os.fspath(path):
    path.write_text(text)
  else:
    tmp = root / f'{CONFIG_FILE}.tmp'
    tmp.write_text(text)
    tmp.replace(path)
  _LOG.info('Config: %s', path)
