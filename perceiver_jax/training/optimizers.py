"""Optimizers and learning-rate schedules built from a config section.

The `optimizer` section of an experiment config (see configs/common.py's
`optimizer`) holds:

  name            'lamb' or 'adamw' (required).
  base_lr         peak learning rate, > 0 (required).
  weight_decay    decoupled weight decay, >= 0 (required); applied to the
                  parameters selected by `weight_decay_mask`, scaled by the
                  learning rate (as optax.lamb / optax.adamw do).
  clip_grad_norm  clip the gradient to this global norm before the optimizer;
                  None or 0 disables (default None).
  b1, b2, eps     Adam moments (defaults 0.9, 0.999; eps 1e-6 for LAMB and
                  1e-8 for AdamW, optax's defaults).
  decay_pos_embs  decay learned position embeddings (default True).
  decay_latents   decay the learned latent array and the learned decoder
                  query array (default True).
  schedule        one of the schedules below (required).

Schedules (step = number of updates already applied, starting at 0):

  'constant'        base_lr.
  'step_decay'      base_lr divided by decay_factor (default 10) at each of
                    decay_epochs (required, ascending epoch numbers): from
                    step decay_epochs[i] * steps_per_epoch on. P1 ImageNet:
                    4e-3, decay_epochs (84, 102, 114) of 120.
  'constant_cosine' base_lr for the first C steps, then a cosine to 0 over
                    the remaining total_steps - C. C is given by exactly one
                    of constant_fraction (of total_steps, in [0, 1]) or
                    constant_epochs. P2 ImageNet: 2e-3 for 55 epochs, cosine
                    over 55 (constant_fraction 0.5 of 110 epochs).
  'warmup_cosine'   linear from 0 to base_lr over warmup_steps (required,
                    < total_steps), then a cosine to 0 at total_steps.

Weight decay (`weight_decay_mask`) skips biases (param 'b' or 'bias') and
normalisation parameters (params 'scale' / 'offset' of LayerNorm, BatchNorm,
RMSNorm, or any param of a module whose name contains 'norm'). All other
parameters, including the latent array ('latents'), the decoder's learned
queries ('queries') and learned position embeddings ('pos_embs'), are
decayed by default: the released Perceiver IO code decays everything except
biases and norm parameters. `decay_pos_embs` / `decay_latents` turn this off
for those arrays (e.g. for the learned-position ablation, where the 50,176 x
128 embedding table is most of the parameters).

P1/P2 use LAMB with weight decay 0.1, global-norm clipping at 10 and no
warmup (warmup often prevented LAMB from training, per the P2 code).
"""

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ('constant', 'step_decay', 'constant_cosine', 'warmup_cosine')
OPTIMIZERS = ('lamb', 'adamw')

_BIAS_NAMES = frozenset({'b', 'bias'})
_NORM_PARAM_NAMES = frozenset({'scale', 'offset'})
_POS_EMB_NAMES = frozenset({'pos_embs'})
_LATENT_NAMES = frozenset({'latents', 'queries'})
_DEFAULT_EPS = {'lamb': 1e-6, 'adamw': 1e-8}


def _get(config: ml_collections.ConfigDict, field: str,
         default: Any = None, *, required: bool = False) -> Any:
  """config.field, None-as-missing; ValueError if required and missing."""
  value = config.get(field, None)
  if value is None:
    if required:
      raise ValueError(
          f'Optimizer config is missing {field!r} (name '
          f'{config.get("name", None)!r}, schedule '
          f'{config.get("schedule", None)!r}); see the docstring of '
          'perceiver_jax/training/optimizers.py for the fields.')
    return default
  return value


def make_schedule(config: ml_collections.ConfigDict, *,
                  steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule described by `config` (module docstring).

  Args:
    config: the optimizer section (fields base_lr, schedule and the chosen
      schedule's fields).
    steps_per_epoch: updates per epoch (converts epochs to steps).
    total_steps: length of training in updates.

  Returns:
    A function step -> learning rate (float32), usable under jit.

  Raises:
    ValueError: for an unknown schedule, a missing field or a bad value.
  """
  if steps_per_epoch < 1 or total_steps < 1:
    raise ValueError(f'steps_per_epoch ({steps_per_epoch}) and total_steps '
                     f'({total_steps}) must be >= 1.')
  name = _get(config, 'schedule', required=True)
  base_lr = float(_get(config, 'base_lr', required=True))
  if base_lr <= 0:
    raise ValueError(f'base_lr must be > 0, got {base_lr}.')

  if name == 'constant':
    return optax.constant_schedule(base_lr)

  if name == 'step_decay':
    decay_epochs = tuple(_get(config, 'decay_epochs', required=True))
    factor = float(_get(config, 'decay_factor', 10.0))
    if factor <= 0:
      raise ValueError(f'decay_factor must be > 0, got {factor}.')
    if (any(e < 0 for e in decay_epochs) or
        list(decay_epochs) != sorted(decay_epochs)):
      raise ValueError('decay_epochs must be non-negative and ascending, got '
                       f'{decay_epochs}.')
    boundaries = jnp.asarray([int(round(e * steps_per_epoch))
                              for e in decay_epochs], jnp.int32)

    def step_decay(step):
      # The new rate applies from the first step of epoch decay_epochs[i].
      num_decays = jnp.sum(jnp.asarray(step)[..., None] >= boundaries, -1)
      return jnp.asarray(base_lr, jnp.float32) * jnp.power(
          jnp.float32(1.0 / factor), num_decays.astype(jnp.float32))

    return step_decay

  if name == 'constant_cosine':
    fraction = _get(config, 'constant_fraction')
    epochs = _get(config, 'constant_epochs')
    if (fraction is None) == (epochs is None):
      raise ValueError("'constant_cosine' needs exactly one of "
                       'constant_fraction or constant_epochs, got '
                       f'{fraction} and {epochs}.')
    if fraction is not None:
      if not 0.0 <= fraction <= 1.0:
        raise ValueError(f'constant_fraction must be in [0, 1], got '
                         f'{fraction}.')
      constant_steps = int(round(fraction * total_steps))
    else:
      if epochs < 0:
        raise ValueError(f'constant_epochs must be >= 0, got {epochs}.')
      constant_steps = int(round(epochs * steps_per_epoch))
    decay_steps = total_steps - constant_steps
    if decay_steps <= 0:
      return optax.constant_schedule(base_lr)
    return optax.join_schedules(
        [optax.constant_schedule(base_lr),
         optax.cosine_decay_schedule(base_lr, decay_steps)], [constant_steps])

  if name == 'warmup_cosine':
    warmup_steps = int(_get(config, 'warmup_steps', required=True))
    if not 0 <= warmup_steps < total_steps:
      raise ValueError(f'warmup_steps must be in [0, total_steps={total_steps}'
                       f'), got {warmup_steps}.')
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=base_lr, warmup_steps=warmup_steps,
        decay_steps=total_steps, end_value=0.0)

  raise ValueError(f'Unknown schedule {name!r}; expected one of {SCHEDULES}.')


def _decays(module_name: str, param_name: str, *, decay_pos_embs: bool,
            decay_latents: bool) -> bool:
  """Whether one haiku parameter gets weight decay."""
  if param_name in _BIAS_NAMES or param_name in _NORM_PARAM_NAMES:
    return False
  if 'norm' in module_name.rsplit('/', 1)[-1]:
    return False
  if param_name in _POS_EMB_NAMES:
    return decay_pos_embs
  if param_name in _LATENT_NAMES:
    return decay_latents
  return True


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def weight_decay_mask(params: hk.Params, *, decay_pos_embs: bool = True,
                      decay_latents: bool = True) -> Any:
  """Which parameters get weight decay (see the module docstring).

  Args:
    params: haiku params {module_name: {param_name: array}} (any pytree
      whose leaves sit under such a path; the last key is the param name,
      the keys before it joined by '/' form the module name).
    decay_pos_embs: decay 'pos_embs' (LearnedPositionEncoding).
    decay_latents: decay 'latents' (encoder) and 'queries' (decoder).

  Returns:
    A pytree of bools with the structure of params.
  """

  def leaf_mask(path, _):
    names = [_key_name(k) for k in path]
    if not names:
      return True
    return _decays('/'.join(names[:-1]), names[-1],
                   decay_pos_embs=decay_pos_embs, decay_latents=decay_latents)

  return jax.tree_util.tree_map_with_path(leaf_mask, params)


def make_optimizer(config: ml_collections.ConfigDict, *, steps_per_epoch: int,
                   total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer described by `config` (module docstring).

  Args:
    config: the optimizer section.
    steps_per_epoch: updates per epoch (for epoch-based schedules).
    total_steps: length of training in updates.

  Returns:
    (optimizer, schedule): clip -> LAMB/AdamW with masked weight decay; the
    schedule maps a step to the learning rate it uses (for logging).

  Raises:
    ValueError: for an unknown optimizer or schedule, a missing field or a
      bad value.
  """
  name = _get(config, 'name', required=True)
  if name not in OPTIMIZERS:
    raise ValueError(f'Unknown optimizer {name!r}; expected one of '
                     f'{OPTIMIZERS}.')
  weight_decay = float(_get(config, 'weight_decay', required=True))
  if weight_decay < 0:
    raise ValueError(f'weight_decay must be >= 0, got {weight_decay}.')
  clip = _get(config, 'clip_grad_norm', 0.0)
  if clip < 0:
    raise ValueError(f'clip_grad_norm must be >= 0 or None, got {clip}.')
  b1 = float(_get(config, 'b1', 0.9))
  b2 = float(_get(config, 'b2', 0.999))
  eps = float(_get(config, 'eps', _DEFAULT_EPS[name]))
  for field, value in (('b1', b1), ('b2', b2)):
    if not 0.0 <= value < 1.0:
      raise ValueError(f'{field} must be in [0, 1), got {value}.')
  if eps < 0:
    raise ValueError(f'eps must be >= 0, got {eps}.')
  decay_pos_embs = bool(_get(config, 'decay_pos_embs', True))
  decay_latents = bool(_get(config, 'decay_latents', True))

  schedule = make_schedule(config, steps_per_epoch=steps_per_epoch,
                           total_steps=total_steps)

  def mask(params):
    return weight_decay_mask(params, decay_pos_embs=decay_pos_embs,
                             decay_latents=decay_latents)

  make = optax.lamb if name == 'lamb' else optax.adamw
  optimizer = make(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                   mask=mask)
  if clip:
    # Gradients arrive summed over devices: this clips the global gradient.
    optimizer = optax.chain(optax.clip_by_global_norm(float(clip)), optimizer)
  return optimizer, schedule
