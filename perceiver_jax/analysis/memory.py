"""Per-device memory of a training step, compiled or estimated.

`training_memory(experiment_config, batch_size, platform)` answers "does a
per-device batch of `batch_size` fit?" for the step the experiment runs:
forward, backward and optimizer update of the config's model, in the
compute dtype `training.precision` resolves to on `platform`.

Where `platform` is the platform of this process's devices, the step is
compiled (from shapes only, nothing runs) and XLA's buffer plan is read:
arguments (parameters, optimizer state, batch) plus temporaries, less what
donation lets the outputs reuse. Elsewhere it is an estimate from the
traced program, in the same categories:

  parameters, gradients  float32, the parameters' size each;
  optimizer_state        optax's state for the config's optimizer;
  batch                  inputs and labels;
  activations            what the backward pass keeps: the residuals of the
                         loss's VJP as traced for `platform` (its kernels'
                         own residuals, e.g. flash attention's q, k, v,
                         output and log-sum-exp; with `remat`, the blocks'
                         inputs only), per example times the batch;
  working                twice the largest array of the step (one value and
                         its cotangent live at the backward's peak); with
                         `remat`, plus what one segment recomputes (the
                         activations remat saves, over its segments).

The estimate merges residuals that compute the same value (as XLA's common
subexpression elimination does) but counts every other residual as its own
buffer, where XLA fuses elementwise chains and keeps fewer: in practice an
upper bound. docs/performance.md compares it with the compiled plan.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import haiku as hk
import jax
import jax.extend  # Not imported by `import jax`; jaxpr helpers.
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from perceiver_jax import ops
from perceiver_jax.analysis import summary
from perceiver_jax.training import losses
from perceiver_jax.training import optimizers
from perceiver_jax.training import precision

GiB = 2**30
PLATFORMS = ('cpu', 'cuda', 'tpu')


def _array_bytes(aval: Any) -> int:
  """Bytes of an array (or its aval); PRNG keys count their key data."""
  dtype = aval.dtype
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return int(np.prod(aval.shape)) * 8  # 2 x uint32 (threefry).
  return int(np.prod(aval.shape)) * jnp.dtype(dtype).itemsize


def _bytes(tree: Any) -> int:
  return sum(_array_bytes(x) for x in jax.tree.leaves(tree))


def local_platform() -> str:
  """This process's device platform, as ops names it ('cuda' for 'gpu')."""
  platform = jax.devices()[0].platform
  return 'cuda' if platform == 'gpu' else platform


def _check_platform(platform: str) -> None:
  if platform not in PLATFORMS:
    raise ValueError(f'Unknown platform {platform!r}; expected one of '
                     f'{PLATFORMS}.')


def batch_spec(data_config: ml_collections.ConfigDict, batch_size: int
               ) -> tuple[Any, jax.ShapeDtypeStruct]:
  """(inputs, labels) ShapeDtypeStructs of a batch of `batch_size`."""
  shape = data_config.input_shape

  def spec(s):
    return jax.ShapeDtypeStruct((batch_size,) + tuple(s), jnp.float32)

  inputs = ({k: spec(v) for k, v in sorted(shape.items())}
            if hasattr(shape, 'items') else spec(shape))
  return inputs, jax.ShapeDtypeStruct((batch_size,), jnp.int32)


def _loss_fn(forward: hk.Transformed) -> Callable[..., jax.Array]:
  """(params, inputs, labels, rng) -> mean softmax cross-entropy."""

  def loss(params, inputs, labels, rng):
    logits = forward.apply(params, rng, inputs, is_training=True)
    return jnp.mean(losses.softmax_cross_entropy(logits, labels))

  return loss


def make_train_step(experiment_config: ml_collections.ConfigDict
                    ) -> tuple[hk.Transformed, optax.GradientTransformation,
                               Callable[..., Any]]:
  """(forward, optimizer, step) of the config's training step.

  `step(params, opt_state, inputs, labels, rng)` -> (params, opt_state,
  loss): softmax cross-entropy, gradient, optimizer update. The dtype
  policy in force when it is traced applies (see `precision_policy`).
  """
  forward = summary.make_forward(experiment_config.model)
  optimizer, _ = optimizers.make_optimizer(
      experiment_config.optimizer, steps_per_epoch=1000, total_steps=10**6)

  def step(params, opt_state, inputs, labels, rng):
    loss, grads = jax.value_and_grad(_loss_fn(forward))(
        params, inputs, labels, rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return forward, optimizer, step


class precision_policy:  # pylint: disable=invalid-name
  """Context: the config's dtype policy as it resolves on `platform`.

  Haiku's policies are process-wide; this sets the experiment's for the
  duration and clears it after (float32 has none).
  """

  def __init__(self, experiment_config: ml_collections.ConfigDict,
               platform: str):
    self.compute_dtype = precision.resolve(
        experiment_config.training.precision,
        'gpu' if platform == 'cuda' else platform)

  def __enter__(self) -> str:
    precision.apply_policy(self.compute_dtype, precision.MODEL_CLASSES)
    return self.compute_dtype

  def __exit__(self, *exc) -> None:
    precision.apply_policy('float32', precision.MODEL_CLASSES)


@dataclasses.dataclass(frozen=True)
class TrainingMemory:
  """Bytes per device of one training step (see the module docstring)."""
  method: str  # 'compiled' or 'estimate'.
  platform: str
  batch_size: int
  compute_dtype: str
  total: int
  parameters: int
  optimizer_state: int
  batch: int
  gradients: Optional[int] = None
  activations: Optional[int] = None
  working: Optional[int] = None
  temporaries: Optional[int] = None  # 'compiled': XLA's temp buffers.

  def as_dict(self) -> dict[str, Any]:
    out = {k: v for k, v in dataclasses.asdict(self).items()
           if v is not None}
    out['total_gib'] = round(self.total / GiB, 3)
    return out


def _abstract_state(forward, optimizer, inputs):
  params = jax.eval_shape(
      lambda x: forward.init(jax.random.key(0), x, is_training=True), inputs)
  return params, jax.eval_shape(optimizer.init, params)


def compiled_memory(experiment_config: ml_collections.ConfigDict,
                    batch_size: int) -> TrainingMemory:
  """XLA's buffer plan of the step compiled for this process's devices."""
  platform = local_platform()
  with precision_policy(experiment_config, platform) as dtype:
    forward, optimizer, step = make_train_step(experiment_config)
    inputs, labels = batch_spec(experiment_config.data, batch_size)
    params, opt_state = _abstract_state(forward, optimizer, inputs)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, opt_state, inputs, labels, rng).compile()
  plan = compiled.memory_analysis()
  if plan is None:
    raise RuntimeError(f'XLA gives no memory analysis on {platform}.')
  total = (plan.argument_size_in_bytes + plan.output_size_in_bytes -
           plan.alias_size_in_bytes + plan.temp_size_in_bytes)
  return TrainingMemory(
      method='compiled', platform=platform, batch_size=batch_size,
      compute_dtype=dtype, total=int(total), parameters=_bytes(params),
      optimizer_state=_bytes(opt_state),
      batch=_bytes((inputs, labels)),
      temporaries=int(plan.temp_size_in_bytes))


def _freeze(value: Any, jaxpr_keys: dict[int, str]) -> Any:
  """A hashable stand-in for an equation parameter."""
  if isinstance(value, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
    if id(value) not in jaxpr_keys:
      jaxpr_keys[id(value)] = str(value)
    return jaxpr_keys[id(value)]
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v, jaxpr_keys) for v in value)
  if isinstance(value, dict):
    return tuple(sorted((k, _freeze(v, jaxpr_keys)) for k, v in value.items()))
  try:
    hash(value)
    return value
  except TypeError:
    return repr(value)


def _distinct_values(jaxpr) -> dict[Any, Any]:
  """var -> the first var computing the same value (common subexpressions,
  as XLA merges them: the same op on the same operands, e.g. the bfloat16
  cast of one parameter at each of its uses)."""
  same: dict[Any, Any] = {}
  first: dict[Any, tuple] = {}
  jaxpr_keys: dict[int, str] = {}
  for eqn in jaxpr.eqns:
    operands = tuple(
        same.get(v, v) if isinstance(v, jax.extend.core.Var)
        else ('literal', repr(v.val), str(v.aval)) for v in eqn.invars)
    key = (eqn.primitive, operands,
           _freeze(dict(eqn.params), jaxpr_keys))
    if eqn.effects:
      continue
    try:
      hash(key)
    except TypeError:
      continue
    if key in first:
      for var, earlier in zip(eqn.outvars, first[key]):
        same[var] = earlier
    else:
      first[key] = tuple(eqn.outvars)
  return same


def _activation_bytes(forward, params, inputs, labels, platform) -> int:
  """Bytes of the distinct residuals of the loss's VJP, less the arguments
  (parameters and batch, counted on their own)."""
  loss = _loss_fn(forward)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  with ops.tracing_for(platform):
    closed, shapes = jax.make_jaxpr(
        lambda *args: jax.vjp(loss, *args), return_shape=True)(
            params, inputs, labels, rng)
  jaxpr = closed.jaxpr
  num_residuals = len(jax.tree.leaves(shapes[1]))
  same = _distinct_values(jaxpr)
  arguments = set(jaxpr.invars)
  residuals = {same.get(v, v) for v in jaxpr.outvars[-num_residuals:]
               if isinstance(v, jax.extend.core.Var)}
  return sum(_array_bytes(v.aval) for v in residuals if v not in arguments)


def _array_sizes(experiment_config, step, batch_size, platform) -> list[int]:
  """Bytes of every array the step computes, in program order."""
  forward, optimizer, _ = make_train_step(experiment_config)
  inputs, labels = batch_spec(experiment_config.data, batch_size)
  params, opt_state = _abstract_state(forward, optimizer, inputs)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  with ops.tracing_for(platform):
    jaxpr = jax.make_jaxpr(step)(params, opt_state, inputs, labels, rng)
  sizes = []

  def walk(jaxpr) -> None:
    for eqn in jaxpr.eqns:
      sizes.extend(_array_bytes(v.aval) for v in eqn.outvars
                   if hasattr(v.aval, 'shape') and hasattr(v.aval, 'dtype'))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  return sizes


def _recomputed_bytes(experiment_config, params, inputs, labels,
                      remat_activations, platform) -> int:
  """What one rematerialised segment holds again during the backward pass:
  the activations remat saves, spread over its segments (one per
  cross-attend and per latent Transformer run)."""
  config = experiment_config.copy_and_resolve_references()
  with config.unlocked():
    config.model.encoder.remat = False
  forward = summary.make_forward(config.model)
  kept = _activation_bytes(forward, params, inputs, labels, platform)
  encoder = config.model.encoder
  cross_attends = encoder.get('num_cross_attends', 8)
  segments = (encoder.get('num_blocks') or cross_attends) + cross_attends
  return max(kept - remat_activations, 0) // segments


def estimated_memory(experiment_config: ml_collections.ConfigDict,
                     batch_size: int, platform: str) -> TrainingMemory:
  """The analytic estimate of the module docstring, for `platform`.

  Traces the step at `batch_size` (shapes only): seconds for paper-scale
  models; `estimate_fn` extrapolates to any batch from two.
  """
  _check_platform(platform)
  with precision_policy(experiment_config, platform) as dtype:
    forward, optimizer, step = make_train_step(experiment_config)
    inputs, labels = batch_spec(experiment_config.data, batch_size)
    params, opt_state = _abstract_state(forward, optimizer, inputs)
    activations = _activation_bytes(forward, params, inputs, labels,
                                    platform)
    working = 2 * max(_array_sizes(experiment_config, step, batch_size,
                                   platform))
    # Baselines have no encoder section and no remat.
    if (experiment_config.model.get('encoder') or {}).get('remat'):
      working += _recomputed_bytes(experiment_config, params, inputs, labels,
                                   activations, platform)
  param_bytes = _bytes(params)
  opt_bytes = _bytes(opt_state)
  batch_bytes = _bytes((inputs, labels))
  total = 2 * param_bytes + opt_bytes + batch_bytes + activations + working
  return TrainingMemory(
      method='estimate', platform=platform, batch_size=batch_size,
      compute_dtype=dtype, total=int(total), parameters=param_bytes,
      gradients=param_bytes, optimizer_state=opt_bytes, batch=batch_bytes,
      activations=int(activations), working=int(working))


def training_memory(experiment_config: ml_collections.ConfigDict,
                    batch_size: int, platform: Optional[str] = None
                    ) -> TrainingMemory:
  """Compiled where `platform` (default: this process's) is present, else
  estimated."""
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  platform = platform or local_platform()
  _check_platform(platform)
  if platform == local_platform():
    return compiled_memory(experiment_config, batch_size)
  return estimated_memory(experiment_config, batch_size, platform)


def largest_batch(memory_at: Callable[[int], TrainingMemory],
                  capacity_bytes: int) -> int:
  """The largest batch b with memory_at(b).total <= capacity_bytes (0 if
  none), by doubling then bisection; memory grows with the batch."""
  if memory_at(1).total > capacity_bytes:
    return 0
  low, high = 1, 2
  while memory_at(high).total <= capacity_bytes:
    low, high = high, high * 2
  while high - low > 1:
    mid = (low + high) // 2
    if memory_at(mid).total <= capacity_bytes:
      low = mid
    else:
      high = mid
  return low


def compiled_fn(experiment_config: ml_collections.ConfigDict
                ) -> Callable[[int], TrainingMemory]:
  """batch -> `compiled_memory`, each batch compiled once."""
  return functools.lru_cache(maxsize=None)(
      functools.partial(compiled_memory, experiment_config))


def estimate_fn(experiment_config: ml_collections.ConfigDict,
                platform: str) -> Callable[[int], TrainingMemory]:
  """batch -> `estimated_memory`, tracing at two batches only.

  Every term is fixed or linear in the batch: the batch, the activations
  (per example) and each array of the step, whose largest gives the
  working set. The two batches are 2 and 4 (at batch 1 some programs take
  other shapes, e.g. a squeezed batch axis).
  """
  base = (2, 4)
  first, second = (estimated_memory(experiment_config, b, platform)
                   for b in base)
  with precision_policy(experiment_config, platform):
    step = make_train_step(experiment_config)[2]
    sizes = [_array_sizes(experiment_config, step, b, platform)
             for b in base]
  aligned = len(sizes[0]) == len(sizes[1])
  lines = sorted(set(zip(*sizes)))  # (bytes at base[0], at base[1]).
  recomputed = (first.working - 2 * max(sizes[0]),
                second.working - 2 * max(sizes[1]))

  def linear(values, batch_size):
    a, b = values
    return a + (b - a) * (batch_size - base[0]) // (base[1] - base[0])

  @functools.lru_cache(maxsize=None)
  def memory_at(batch_size: int) -> TrainingMemory:
    if not aligned:  # The programs differ: trace this batch.
      return estimated_memory(experiment_config, batch_size, platform)
    working = (2 * max(linear(line, batch_size) for line in lines) +
               linear(recomputed, batch_size))
    batch = linear((first.batch, second.batch), batch_size)
    activations = linear((first.activations, second.activations),
                         batch_size)
    total = (first.parameters + first.gradients + first.optimizer_state +
             batch + activations + working)
    return dataclasses.replace(
        first, batch_size=batch_size, total=int(total), batch=int(batch),
        activations=int(activations), working=int(working))

  return memory_at
