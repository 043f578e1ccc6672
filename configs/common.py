"""Helpers shared by the config files: presets and the jaxline skeleton.

A config is selected as `--config=configs/<exp>.py:<arg>` where arg is a
comma-separated list of presets and typed options, e.g. `permuted,debug` or
`pos=learned,seed=3`. `parse_arg` turns it into a typed ConfigDict; an
unknown name is an error, never silently ignored.
"""

from typing import Any, Optional

from jaxline import base_config
import ml_collections


def parse_arg(arg: Optional[str], **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'a,b=1,c=x' against typed defaults.

  A bare name sets a boolean option to True; `name=value` converts value to
  the type of the default (bool accepts true/false/1/0).

  Raises:
    ValueError: for a name not in defaults or a value of the wrong type.
  """
  options = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or '').split(','))):
    name, has_value, value = item.partition('=')
    if name not in defaults:
      raise ValueError(f'Unknown config option {name!r} in {arg!r}; valid '
                       f'options: {sorted(defaults)}.')
    default = defaults[name]
    if not has_value:
      if not isinstance(default, bool):
        raise ValueError(f'Config option {name!r} needs a value: {name}=...')
      options[name] = True
    elif isinstance(default, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'Config option {name}={value!r} is not a bool.')
      options[name] = value.lower() in ('true', '1')
    elif default is None or isinstance(default, str):
      options[name] = value
    else:
      try:
        options[name] = type(default)(value)
      except ValueError:
        raise ValueError(f'Config option {name}={value!r} is not a '
                         f'{type(default).__name__}.') from None
  return ml_collections.ConfigDict(options)


def jaxline_config(
    *, experiment: ml_collections.ConfigDict, training_steps: int,
    checkpoint_dir: str, best_metric: str = 'top_1_acc',
    save_checkpoint_interval: int = 1000, log_interval: int = 100,
    eval_initial_weights: bool = False) -> ml_collections.ConfigDict:
  """jaxline's base config around our experiment section.

  Intervals are in steps, so that all hosts checkpoint at the same step.
  Adds to the experiment's training section, unless it has them:
    init_checkpoint (None): a project checkpoint (root, series or step
      directory) whose params and model state start training, with a fresh
      optimizer at step 0 (see experiments/classification.py).
    max_nonfinite_steps (0): how many steps in a row whose loss, gradients
      or update are not finite may be skipped (params unchanged, data and
      step counter moving on) before the run stops. A non-finite update is
      never applied, whatever this says.
    total_steps: the learning-rate schedule's length, following
      training_steps one way (see `_follow`).
  """
  training = experiment.training
  if 'init_checkpoint' not in training:
    training.init_checkpoint = ml_collections.FieldReference(
        None, field_type=str)
  if 'max_nonfinite_steps' not in training:
    training.max_nonfinite_steps = 0
  config = base_config.get_base_config()
  config.training_steps = training_steps
  total_steps = training.get('total_steps', training_steps)
  _follow(training, 'total_steps', config, 'training_steps',
          linked=total_steps == training_steps)
  config.experiment_kwargs = ml_collections.ConfigDict(
      dict(config=experiment))
  config.interval_type = 'steps'
  config.save_checkpoint_interval = save_checkpoint_interval
  config.log_tensors_interval = log_interval
  config.log_train_data_interval = log_interval
  config.log_async = False
  config.checkpoint_dir = checkpoint_dir
  config.max_checkpoints_to_keep = 3
  # Saves in a background thread when True; synchronous by default (an
  # async save cut short by preemption is never listed, but that path is
  # less tested).
  config.checkpoint_async = False
  config.best_model_eval_metric = best_metric
  config.best_model_eval_metric_higher_is_better = True
  config.eval_initial_weights = eval_initial_weights
  # Multi-host: set these (or the matching scripts/train.py flags) to run
  # jax.distributed.initialize; on Cloud TPU it is automatic.
  config.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address='', num_processes=1,
      process_id=0))
  return config


def _follow(target: ml_collections.ConfigDict, name: str,
            source: ml_collections.ConfigDict, source_name: str,
            linked: bool = True) -> None:
  """Makes target.name follow source.source_name one way.

  A plain `target.name = source.get_ref(source_name)` makes the two one
  FieldReference: overriding either (--config.<...>.total_steps=1000)
  changes both, so with two overrides the later one silently wins. Here
  target.name is a reference of its own whose value is source's reference:
  it follows source until it is set itself, and setting it leaves source
  as it is. A config file that later assigns `source.get_ref(...)` to
  target.name sets this reference's value, keeping it one-way.
  """
  value = target.get(name, source[source_name])
  field = ml_collections.FieldReference(value, field_type=int)
  if linked:
    field.set(source.get_ref(source_name))
  with target.ignore_type():
    target[name] = field


def optimizer(name: str = 'lamb', base_lr: float = 4e-3,
              weight_decay: float = 0.1, clip_grad_norm: float = 10.0,
              schedule: str = 'step_decay', decay_pos_embs: bool = True,
              decay_latents: bool = True, **schedule_kwargs: Any
              ) -> ml_collections.ConfigDict:
  """An optimizer section (see perceiver_jax/training/optimizers.py).

  Weight decay never applies to biases and normalisation parameters;
  decay_pos_embs / decay_latents choose it for learned position encodings
  and for the learned latent (and decoder query) arrays.
  """
  return ml_collections.ConfigDict(dict(
      name=name, base_lr=base_lr, weight_decay=weight_decay,
      clip_grad_norm=clip_grad_norm, schedule=schedule,
      decay_pos_embs=decay_pos_embs, decay_latents=decay_latents,
      **schedule_kwargs))


def efficiency_options(chunk_size: Optional[int] = None) -> dict[str, Any]:
  """Encoder fields that change cost, never results (see attention.py).

  cross_attention: 'auto' (cheaper exact formulation), 'direct' (the paper's)
    or 'reformulated' (never projects the byte array; one head only).
  cross_attention_chunk_size: process the byte array in chunks of this many
    inputs with an online softmax (None: all at once).
  reuse_shared_inputs: cross-attends sharing weights share LN(inputs) and its
    projections.
  remat: recompute each block's activations in the backward pass.
  """
  return dict(
      cross_attention='auto',
      cross_attention_chunk_size=ml_collections.FieldReference(
          chunk_size, field_type=int),
      reuse_shared_inputs=True, remat=False)
