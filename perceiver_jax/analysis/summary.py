"""A model's size and cost from its config, without running it.

`summarize` traces the model with jax.eval_shape / make_jaxpr only, so
paper-scale models take seconds on a CPU.
"""

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from perceiver_jax.analysis import flops
from perceiver_jax import models


def input_spec(data_config, batch_size: int = 1) -> Any:
  """ShapeDtypeStructs [batch_size, *data.input_shape] (a dict if nested)."""
  shape = data_config.input_shape

  def spec(s):
    return jax.ShapeDtypeStruct((batch_size,) + tuple(s), jnp.float32)

  if hasattr(shape, 'items'):
    return {k: spec(v) for k, v in shape.items()}
  return spec(shape)


def paper_formulation(model_config):
  """The model section with the paper's (direct, unshared-input) attention."""
  model_config = model_config.copy_and_resolve_references()
  with model_config.unlocked():
    model_config.encoder.cross_attention = 'direct'
    model_config.encoder.reuse_shared_inputs = False
  return model_config


def forward_flops(model_config, inputs) -> int:
  """Matmul FLOPs of one forward pass on `inputs` (ShapeDtypeStructs)."""
  forward = models.make_forward(model_config)
  params = jax.eval_shape(
      lambda x: forward.init(jax.random.key(0), x, is_training=False), inputs)
  return flops.count_flops(
      lambda p, x: forward.apply(p, None, x, is_training=False),
      params, inputs)


def summarize(experiment_config) -> dict[str, Any]:
  """Parameter count, forward FLOPs per example and byte array shape.

  forward_flops counts the formulation that runs (exact reformulations of
  cross-attention included); paper_forward_flops the paper's direct one.
  """
  model_config = experiment_config.model
  inputs = input_spec(experiment_config.data)
  forward = models.make_forward(model_config)
  rng = jax.random.key(0)
  params = jax.eval_shape(
      lambda x: forward.init(rng, x, is_training=False), inputs)
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  run_flops = forward_flops(model_config, inputs)
  paper_flops = forward_flops(paper_formulation(model_config), inputs)
  preprocess = hk.transform(lambda x: models.build_preprocessor(
      model_config.preprocessor, name='preprocessor')(x, is_training=False))
  pre_params = jax.eval_shape(lambda x: preprocess.init(rng, x), inputs)
  byte_array, _ = jax.eval_shape(
      lambda p, x: preprocess.apply(p, rng, x), pre_params, inputs)
  encoder = model_config.encoder
  return {
      'params': num_params,
      'params_m': round(num_params / 1e6, 2),
      'forward_flops': run_flops,
      'gflops': round(run_flops / 1e9, 1),
      'paper_forward_flops': paper_flops,
      'paper_gflops': round(paper_flops / 1e9, 1),
      'byte_array': list(byte_array.shape[1:]),
      'latents': [encoder.num_latents, encoder.latent_dim],
  }
