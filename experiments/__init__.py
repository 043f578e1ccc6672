"""jaxline experiment classes, by the name a config gives in `experiment`."""

import importlib

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
