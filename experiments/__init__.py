"""jaxline experiment classes, by the name a config gives in `experiment`."""

import importlib

import jax
import numpy as np

from perceiver_jax.training import checkpointing

# name -> (module under experiments, class name); imported on demand.
EXPERIMENTS = {
    'classification': ('classification', 'ClassificationExperiment'),
    'multilabel': ('multilabel', 'MultiLabelExperiment'),
}


def get_experiment_class(name: str):
  if name not in EXPERIMENTS:
    raise ValueError(
        f'Unknown experiment {name!r}; expected one of {sorted(EXPERIMENTS)}.')
  module, cls = EXPERIMENTS[name]
  return getattr(importlib.import_module(f'experiments.{module}'), cls)


def evaluate_checkpoint(config, checkpoint: str, split=None) -> dict:
  """Restores `checkpoint` into the config's experiment and evaluates it."""
  exp_config = config.experiment_kwargs.config
  if split is not None:
    with exp_config.unlocked():
      exp_config.data.eval_split = split
  experiment_class = get_experiment_class(exp_config.experiment)
  experiment = experiment_class('eval', jax.random.key(config.random_seed),
                                exp_config)
  restored = checkpointing.restore_checkpoint(checkpoint)
  experiment.restore_from_snapshot(restored['experiment_module'])
  step = int(restored['global_step'])
  metrics = experiment.evaluate(
      global_step=np.full([jax.local_device_count()], step), rng=None)
  return {'step': step, 'split': exp_config.data.eval_split,
          **{k: float(v) for k, v in metrics.items()}}
