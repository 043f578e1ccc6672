"""A model's size and cost from its config, without running it.

`summarize` traces the model with jax.eval_shape / make_jaxpr only, so
paper-scale models take seconds on a CPU. It counts Perceivers and P1's
baselines (model.type 'resnet', 'vit', 'transformer'; models.py) alike;
FLOPs include convolutions (analysis/flops.py).
"""

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from perceiver_jax.analysis import flops
from perceiver_jax import models


def make_forward(model_config) -> hk.Transformed:
  """`models.make_forward`, also for models with state (BatchNorm).

  A stateful model's state is zeros of its shapes, made inside `apply`: for
  counting parameters, FLOPs and memory, not for training.
  """
  if not models.has_state(model_config):
    return models.make_forward(model_config)
  forward = models.make_forward_with_state(model_config)

  def init(rng, inputs, is_training):
    del is_training  # BatchNorm creates its averages in training mode only.
    return forward.init(rng, inputs, is_training=True)[0]

  def apply(params, rng, inputs, is_training):
    # Zeros of the state's shapes (eval_shape: nothing of init is traced
    # into the program); initialised as in training, where BatchNorm
    # creates its averages.
    shapes = jax.eval_shape(
        lambda x: forward.init(jax.random.key(0), x, is_training=True)[1],
        inputs)
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return forward.apply(params, state, rng, inputs,
                         is_training=is_training)[0]

  return hk.Transformed(init, apply)


def input_spec(data_config, batch_size: int = 1) -> Any:
  """ShapeDtypeStructs [batch_size, *data.input_shape] (a dict if nested)."""
  shape = data_config.input_shape

  def spec(s):
    return jax.ShapeDtypeStruct((batch_size,) + tuple(s), jnp.float32)

  if hasattr(shape, 'items'):
    return {k: spec(v) for k, v in shape.items()}
  return spec(shape)


def paper_formulation(model_config):
  """The model section with the paper's (direct, unshared-input) attention.

  A baseline has no cross-attention to reformulate: its section unchanged.
  """
  model_config = model_config.copy_and_resolve_references()
  if models.model_type(model_config) != 'perceiver':
    return model_config
  with model_config.unlocked():
    model_config.encoder.cross_attention = 'direct'
    model_config.encoder.reuse_shared_inputs = False
  return model_config


def forward_flops(model_config, inputs) -> int:
  """Matmul FLOPs of one forward pass on `inputs` (ShapeDtypeStructs)."""
  forward = make_forward(model_config)
  params = jax.eval_shape(
      lambda x: forward.init(jax.random.key(0), x, is_training=False), inputs)
  return flops.count_flops(
      lambda p, x: forward.apply(p, None, x, is_training=False),
      params, inputs)


def summarize(experiment_config) -> dict[str, Any]:
  """Parameter count, forward FLOPs per example and byte array shape.

  forward_flops counts the formulation that runs (exact reformulations of
  cross-attention included); paper_forward_flops the paper's direct one
  (the same for a baseline). 'model' is the model type; 'latents' [N, D]
  is given for a Perceiver only.
  """
  model_config = experiment_config.model
  inputs = input_spec(experiment_config.data)
  forward = make_forward(model_config)
  rng = jax.random.key(0)
  params = jax.eval_shape(
      lambda x: forward.init(rng, x, is_training=False), inputs)
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  run_flops = forward_flops(model_config, inputs)
  paper_flops = forward_flops(paper_formulation(model_config), inputs)
  preprocess = hk.transform_with_state(
      lambda x, is_training: models.build_preprocessor(
          model_config.preprocessor, name='preprocessor')(
              x, is_training=is_training))
  pre_params, pre_state = jax.eval_shape(
      lambda x: preprocess.init(rng, x, True), inputs)
  (byte_array, _), _ = jax.eval_shape(
      lambda p, s, x: preprocess.apply(p, s, rng, x, False), pre_params,
      pre_state, inputs)
  result = {
      'model': models.model_type(model_config),
      'params': num_params,
      'params_m': round(num_params / 1e6, 2),
      'forward_flops': run_flops,
      'gflops': round(run_flops / 1e9, 1),
      'paper_forward_flops': paper_flops,
      'paper_gflops': round(paper_flops / 1e9, 1),
      'byte_array': list(byte_array.shape[1:]),
  }
  if result['model'] == 'perceiver':
    encoder = model_config.encoder
    result['latents'] = [encoder.num_latents, encoder.latent_dim]
  return result
