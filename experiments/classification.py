"""jaxline experiment: single-label classification with a Perceiver.

Anatomy (jaxline): the experiment is built once per process; parameters and
optimizer state are created lazily on the first step (or restored from a
checkpoint first), replicated over the local devices, and updated by one
pmapped, buffer-donating function. Gradients are averaged over every device
of every host (one pmap axis spans all hosts). Evaluation runs on every
device and counts every example exactly once: loaders pad the last batch and
mark the padding in batch['mask'].

Model state (BatchNorm's moving averages, `models.has_state`) is carried
through the pmapped step beside the parameters. BatchNorm normalises with each
device's own batch statistics, as the released Perceiver IO code does (no
cross-device statistics); after each step the floating-point state is
averaged over all devices (pmean), so every device holds the same state and
the checkpoint (taken from the first local device) stands for all of them.
Such a model's checkpoints hold 'state' beside 'params' and 'opt_state';
stateless models' checkpoints are as before.

`training.init_checkpoint` (a checkpoint root, series or step directory of
this project, e.g. written by scripts/import_checkpoint.py) initialises the
params and model state of a new run; the optimizer state and step start
afresh. Names and shapes must match the config's model (else a ValueError
lists the differences): a Fourier-feature model takes any input resolution,
a learned position encoding only the one it was trained at. A run that
resumes from its own checkpoint ignores init_checkpoint.

A finite-update guard runs inside the pmapped step: if the loss, gradients,
updates or new params/state hold a NaN or an infinity on any device, the
step is not applied (every device keeps its params, optimizer and model
state), so no checkpoint can hold a diverged state. step() then stops the
run naming the step and the newest checkpoint, or skips up to
`training.max_nonfinite_steps` such steps in a row (data and step counter
move on; the optimizer's own count does not), logging each.

The config (experiment_kwargs.config) has sections data / model / optimizer /
training / evaluation; see configs/digits.py for a documented example.
"""

import functools
import time
from typing import Any, Iterator, Mapping, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from perceiver_jax import data as data_lib
from perceiver_jax import models
from perceiver_jax.analysis import flops
from perceiver_jax.training import checkpointing
from perceiver_jax.training import jaxline_compat
from perceiver_jax.training import logs
from perceiver_jax.training import losses
from perceiver_jax.training import metrics
from perceiver_jax.training import optimizers
from perceiver_jax.training import parallel
from perceiver_jax.training import precision
from perceiver_jax.training import preemption
from perceiver_jax.training import throughput
from perceiver_jax.training import tree_io

jaxline = jaxline_compat.import_jaxline()
_AXIS = parallel.AXIS_NAME
_LOG = logs.get_logger(__name__)


class NonFiniteUpdateError(FloatingPointError):
  """A training step's loss, gradients or update held a NaN or infinity
  (more than training.max_nonfinite_steps times in a row)."""


# The name of earlier versions.
NonFiniteLossError = NonFiniteUpdateError


class ClassificationExperiment(jaxline.experiment.AbstractExperiment):
  """Trains and evaluates a Perceiver classifier (softmax cross-entropy)."""

  # Attributes saved in checkpoints (taken from the first local device).
  # An instance whose model has state also saves STATE_CHECKPOINT_ATTRS.
  CHECKPOINT_ATTRS = {'_params': 'params', '_opt_state': 'opt_state'}
  STATE_CHECKPOINT_ATTRS = {'_state': 'state'}

  def __init__(self, mode: str, init_rng: jax.Array,
               config: ml_collections.ConfigDict):
    super().__init__(mode=mode, init_rng=init_rng)
    self.mode = mode
    self.config = config
    self._init_rng = init_rng
    # 'auto' follows the devices this process trains on (bf16 on GPU/TPU).
    self.compute_dtype = precision.resolve(
        config.training.precision, jax.local_devices()[0].platform)
    precision.apply_policy(self.compute_dtype, precision.MODEL_CLASSES)
    self.model_has_state = models.has_state(config.model)
    self.forward_with_state = models.make_forward_with_state(config.model)
    # The plain transform, for subclasses' code that calls it (multilabel's
    # evaluation); None for a model with state.
    self.forward = (None if self.model_has_state
                    else models.make_forward(config.model))
    if self.model_has_state:
      self.CHECKPOINT_ATTRS = {**type(self).CHECKPOINT_ATTRS,
                               **self.STATE_CHECKPOINT_ATTRS}
    self._data = data_lib.get_module(config.data.name)

    self._params = None
    # Model state, replicated as the params; {} for a stateless model.
    self._state = None if self.model_has_state else {}
    self._opt_state = None
    self._train_input: Optional[Iterator[Mapping[str, Any]]] = None
    self._stop_votes = 0
    self._nonfinite_in_a_row = 0
    # From jaxline's config, seen by should_run_step (None outside jaxline).
    self._run_steps: Optional[int] = None
    self._checkpoint_dir: Optional[str] = None
    self._rate: Optional[throughput.StepRate] = None
    self._flops_per_device_step = None

    self._train_batch_dims = parallel.batch_dims(config.training.batch_size,
                                                 'training.batch_size')
    self._eval_batch_dims = parallel.batch_dims(config.evaluation.batch_size,
                                                'evaluation.batch_size')
    steps_per_epoch = max(
        1, config.data.num_train_examples // config.training.batch_size)
    self._optimizer, self._schedule = optimizers.make_optimizer(
        config.optimizer, steps_per_epoch=steps_per_epoch,
        total_steps=config.training.total_steps)
    self._update_pmap = jax.pmap(self._update_fn, axis_name=_AXIS,
                                 donate_argnums=(0, 1, 2))
    self._eval_pmap = jax.pmap(self._eval_fn, axis_name=_AXIS)

  # Training.

  def step(self, *, global_step: jax.Array, rng: jax.Array,
           writer: Any = None) -> dict[str, np.ndarray]:
    """One update on a global batch; returns scalars logged by jaxline."""
    del writer
    if self._train_input is None:
      # Steps already taken (non-zero when resuming from a checkpoint).
      self._initialize_train(int(jaxline.utils.get_first(global_step)))
    batch = next(self._train_input)
    stop = np.full([jax.local_device_count()],
                   preemption.stop_requested(), np.int32)
    if self._flops_per_device_step is None:
      # Traced, not run: the pmapped step's body is one device's work.
      self._flops_per_device_step = flops.count_flops(
          self._update_pmap, self._params, self._state, self._opt_state,
          global_step, rng, batch, stop,
          platform=jax.local_devices()[0].platform)
    self._params, self._state, self._opt_state, scalars = self._update_pmap(
        self._params, self._state, self._opt_state, global_step, rng, batch,
        stop)
    scalars = jax.device_get(jaxline.utils.get_first(scalars))
    step = int(jaxline.utils.get_first(global_step))
    self._stop_votes = int(scalars.pop('stop_votes'))
    self._check_finite(step, scalars)
    scalars.update(self._throughput(step, float(scalars['loss'])))
    return scalars

  def _check_finite(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Skips (logging it) or stops at a step the update did not apply.

    A non-finite step leaves params, optimizer and model state as they were
    (see _update_fn), so whatever jaxline saves holds finite values. Steps
    are named 1-based, as the progress lines name them.

    Raises:
      NonFiniteUpdateError: after more than training.max_nonfinite_steps
        non-finite steps in a row.
    """
    if not scalars['nonfinite']:
      self._nonfinite_in_a_row = 0
      return
    self._nonfinite_in_a_row += 1
    allowed = self.config.training.get('max_nonfinite_steps', 0)
    run_steps = self._run_steps or self.config.training.total_steps
    what = (f'step {step + 1}/{run_steps}: non-finite loss, gradient or '
            f'update (loss {float(scalars["loss"]):.4g}, gradient norm '
            f'{float(scalars["grad_norm"]):.4g}), not applied')
    if self._nonfinite_in_a_row <= allowed:
      _LOG.warning('%s; params unchanged, skipped (%d in a row, at most %d: '
                   'training.max_nonfinite_steps).', what,
                   self._nonfinite_in_a_row, allowed)
      return
    in_a_row = (f' ({self._nonfinite_in_a_row} in a row, more than '
                f'training.max_nonfinite_steps={allowed})' if allowed else '')
    raise NonFiniteUpdateError(
        f'Stopping at {what}{in_a_row}. {self._last_good_checkpoint()} '
        'Lower optimizer.base_lr, or set training.max_nonfinite_steps to '
        'skip such steps.')

  def _last_good_checkpoint(self) -> str:
    """Where the last good parameters are, for the non-finite error."""
    params_finite = all(np.all(np.isfinite(x)) for x in jax.tree.leaves(
        parallel.unreplicate((self._params, self._state)))
                        if np.issubdtype(x.dtype, np.inexact))
    if not params_finite:
      return ('The parameters were already non-finite before this step '
              '(restored from a checkpoint written without this check?): '
              'restart from an earlier checkpoint.')
    newest = None
    if self._checkpoint_dir:
      try:
        newest = checkpointing.latest_step(self._checkpoint_dir)
      except (OSError, ValueError):
        pass
    if newest is None:
      return ('No step was applied with non-finite values, so any '
              'checkpoint saved so far holds finite ones.')
    return (f'No non-finite update was applied: the newest checkpoint, step '
            f'{newest} in {self._checkpoint_dir}, holds the last good '
            'parameters, and a rerun resumes there.')

  def should_run_step(self, global_step: int,
                      config: ml_collections.ConfigDict) -> bool:
    """Stops at training_steps, or early (and saves) when any host is asked
    to (SIGTERM/SIGINT): every host sees the same vote through the update."""
    if self._run_steps is None:
      self._run_steps = int(config.training_steps)
      self._checkpoint_dir = config.get('checkpoint_dir')
      total = self.config.training.total_steps
      if total != self._run_steps:
        _LOG.warning(
            'training_steps=%d but training.total_steps=%d: training stops '
            'at step %d of a %d-step learning-rate schedule.',
            self._run_steps, total, self._run_steps, total)
    if self._stop_votes:
      _LOG.warning('Stop requested at step %d: saving and exiting.',
                   global_step)
      preemption.request_stop()  # Also where no signal arrived (multi-host).
      return False
    return global_step < config.training_steps

  def _throughput(self, step: int, loss: float) -> dict[str, float]:
    """Rates over the last progress interval; logs the progress line.

    The rate (hence the ETA) is a moving average over the steps between
    progress lines, the steps_per_sec jaxline logs when its
    log_tensors_interval is the same. A line comes every
    training.log_every_steps, at least every tenth of the run, and at its
    last step.
    """
    done = step + 1  # Steps done after this one.
    run_steps = self._run_steps or self.config.training.total_steps
    every = logs.progress_interval(self.config.training.log_every_steps,
                                   run_steps)
    if self._rate is None:
      self._rate = throughput.StepRate(window=max(1, every))
    steps_per_sec = self._rate.update(done, time.time())
    if steps_per_sec is None:
      return {}
    rates = {'steps_per_sec': steps_per_sec,
             'examples_per_sec': steps_per_sec * self.config.training.batch_size,
             **throughput.step_metrics(self._flops_per_device_step or 0.0,
                                       steps_per_sec, jax.local_devices()[0])}
    if every and (done % every == 0 or done == run_steps):
      mfu = f'  MFU {rates["mfu"]:.1%}' if 'mfu' in rates else ''
      _LOG.info('step %d/%d  loss %.4f  steps/sec %.2f  TFLOP/s/device %.3g'
                '%s  ETA %s', done, run_steps, loss, steps_per_sec,
                rates['tflops_per_device'], mfu,
                logs.format_duration(max(0, run_steps - done) / steps_per_sec))
    return rates

  def _initialize_train(self, start_step: int) -> None:
    self._train_input = self._build_input(is_training=True,
                                          start_step=start_step)
    if self._params is None:
      self._initialize_params(self._peek_train_batch())

  def _peek_train_batch(self) -> Mapping[str, Any]:
    first = next(self._train_input)
    rest = self._train_input

    def chained():
      yield first
      yield from rest

    self._train_input = chained()
    return first

  def _initialize_params(self, batch: Mapping[str, Any]) -> None:
    """Creates params, model state and optimizer state, identical on every
    host; params and model state from training.init_checkpoint if set."""
    inputs = jax.tree.map(lambda x: x[0], batch['inputs'])  # One device.
    # Jitted: one compilation instead of many small eager ops.
    params, state = jax.jit(functools.partial(
        self.forward_with_state.init, is_training=True))(
            self._init_rng, inputs)
    init_checkpoint = self.config.training.get('init_checkpoint')
    if init_checkpoint:
      params, state = self._read_init_checkpoint(init_checkpoint, params,
                                                 state)
    opt_state = jax.jit(self._optimizer.init)(params)
    self._params = parallel.replicate(params)
    self._state = parallel.replicate(state)
    self._opt_state = parallel.replicate(opt_state)

  def _read_init_checkpoint(self, path: str, params: hk.Params,
                            state: hk.State) -> tuple[hk.Params, hk.State]:
    """The params and model state of checkpoint `path`, checked against
    (and cast to the dtypes of) the freshly initialised `params`, `state`."""
    snapshot = checkpointing.restore_checkpoint(path)['experiment_module']
    loaded_state = snapshot.get('state') or {}
    problems = (_differences('params', params, snapshot.get('params') or {}) +
                _differences('state', state, loaded_state))
    if problems:
      hint = ''
      if any('another shape: preprocessor/position_encoding/' in line
             for line in problems):
        hint = ('\nA learned position encoding has one embedding per input '
                'position: fine-tune at the resolution it was trained at '
                '(Fourier features take any resolution).')
      raise ValueError(
          f'training.init_checkpoint={path!r} does not match the config\'s '
          f'model:\n' + '\n'.join(problems) + hint)
    cast = lambda want, got: np.asarray(got, want.dtype)
    _LOG.info('Initialised params%s from %s.',
              ' and model state' if state else '', path)
    return (jax.tree.map(cast, params, snapshot['params']),
            jax.tree.map(cast, state, loaded_state))

  def _build_input(self, is_training: bool, start_step: int = 0
                   ) -> Iterator[Mapping[str, Any]]:
    data = self.config.data
    if is_training:
      # Hosts read disjoint shards, so they may share the shuffling seed.
      return self._data.load(
          data, data.train_split, is_training=True,
          batch_dims=self._train_batch_dims,
          seed=self.config.training.data_seed, start_step=start_step)
    return self._data.load(data, data.eval_split, is_training=False,
                           batch_dims=self._eval_batch_dims, seed=0)

  def loss(self, logits: jax.Array, batch: Mapping[str, Any]) -> jax.Array:
    """Per-example training loss [B]."""
    labels = batch['label_probs'] if 'label_probs' in batch else batch['label']
    return losses.softmax_cross_entropy(
        logits, labels, label_smoothing=self.config.training.label_smoothing)

  def _update_fn(self, params: hk.Params, state: hk.State,
                 opt_state: optax.OptState, global_step: jax.Array,
                 rng: jax.Array, batch: Mapping[str, Any], stop: jax.Array):
    """Runs on each device: gradients of the mean loss over all devices.

    Returns (params, state, opt_state, scalars), identical on every device.
    A step with a non-finite loss, gradient, update, new params or new state
    on any device returns the params and states it was given, and
    scalars['nonfinite'] = 1 (else 0).
    """
    mask = batch['mask']
    count = jax.lax.psum(jnp.sum(mask), _AXIS)

    def loss_fn(p):
      logits, new_state = self.forward_with_state.apply(
          p, state, rng, batch['inputs'], is_training=True)
      per_example = self.loss(logits, batch)
      # Local sum over the global count: psum of these is the global mean.
      return jnp.sum(per_example * mask) / count, (logits, new_state)

    (loss, (logits, new_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    # Moving averages of per-device statistics, made equal on every device
    # (integer counters already are).
    new_state = jax.tree.map(
        lambda x: (jax.lax.pmean(x, _AXIS)
                   if jnp.issubdtype(x.dtype, jnp.floating) else x), new_state)
    grads = jax.lax.psum(grads, _AXIS)
    loss = jax.lax.psum(loss, _AXIS)
    updates, new_opt_state = self._optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    # The finite-update guard: a step whose loss, gradients, updates or new
    # params/state hold a NaN or an infinity is not applied (on any device),
    # so no checkpoint can hold its values; step() decides whether to stop.
    finite = parallel.all_devices(_all_finite(
        (loss, grads, updates, new_params, new_state)))
    keep_finite = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    params = keep_finite(new_params, params)
    state = keep_finite(new_state, state)
    opt_state = keep_finite(new_opt_state, opt_state)
    scalars = {
        'loss': loss,
        'learning_rate': self._schedule(global_step),
        'grad_norm': optax.global_norm(grads),
        'nonfinite': 1 - finite.astype(jnp.int32),
        'stop_votes': jax.lax.psum(stop, _AXIS),
    }
    scalars.update(self._train_metrics(logits, batch, mask, count))
    return params, state, opt_state, scalars

  def _train_metrics(self, logits, batch, mask, count):
    top1 = metrics.topk_correct(logits, batch['label'], 1)
    return {'top_1_acc': jax.lax.psum(jnp.sum(top1 * mask), _AXIS) / count}

  # Evaluation.

  def evaluate(self, *, global_step: jax.Array, rng: jax.Array,
               writer: Any = None) -> dict[str, float]:
    """One pass over the eval split on all devices of all hosts."""
    del rng, writer
    if self._params is None:
      raise RuntimeError(
          'No parameters to evaluate: restore a checkpoint first, or set '
          'eval_initial_weights.')
    totals = None
    for batch in self._build_input(is_training=False):
      sums = jax.device_get(jaxline.utils.get_first(
          self._eval_pmap(self._params, batch, self._state)))
      totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    if totals is None:
      raise ValueError(f'Eval split {self.config.data.eval_split!r} is empty.')
    results = self.summarize_eval(totals)
    _LOG.info('eval at step %d: %s', int(jaxline.utils.get_first(
        global_step)), {k: round(float(v), 4) for k, v in results.items()})
    return results

  def _eval_fn(self, params: hk.Params, batch: Mapping[str, Any],
               state: hk.State):
    """Sums over this batch on all devices (psum): counts, correct, loss."""
    logits, _ = self.forward_with_state.apply(
        params, state, None, batch['inputs'], is_training=False)
    mask = batch['mask']
    labels = batch['label']
    sums = {
        'count': jnp.sum(mask),
        'loss': jnp.sum(losses.softmax_cross_entropy(logits, labels) * mask),
        'top_1': jnp.sum(metrics.topk_correct(logits, labels, 1) * mask),
    }
    if logits.shape[-1] > 5:
      sums['top_5'] = jnp.sum(metrics.topk_correct(logits, labels, 5) * mask)
    if self.config.evaluation.per_class_metrics:
      num_classes = logits.shape[-1]
      preds = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
      truth = jax.nn.one_hot(labels, num_classes) * mask[:, None]
      sums['confusion'] = truth.T @ preds  # [K_true, K_pred]
    return jax.lax.psum(sums, _AXIS)

  def summarize_eval(self, totals: Mapping[str, np.ndarray]
                     ) -> dict[str, float]:
    count = float(totals['count'])
    results = {'num_examples': count,
               'loss': float(totals['loss']) / count,
               'top_1_acc': float(totals['top_1']) / count}
    if 'top_5' in totals:
      results['top_5_acc'] = float(totals['top_5']) / count
    if 'confusion' in totals:
      confusion = np.rint(totals['confusion']).astype(np.int64)
      results['mean_class_acc'] = float(
          metrics.mean_class_accuracy(confusion))
      per_class = metrics.per_class_accuracy(confusion)
      for k, acc in enumerate(per_class):
        if np.isfinite(acc):
          results[f'class_acc/{k:03d}'] = float(acc)
    return results

  # Checkpoints (see perceiver_jax/training/checkpointing.py).

  def snapshot_state(self) -> dict[str, Any]:
    """The first local device's copy of each checkpointed attribute.

    As jaxline's, but read from one shard (`parallel.unreplicate`) rather
    than by indexing, which in a multi-process run is an eager computation
    that can hang.
    """
    return {chk_name: parallel.unreplicate(getattr(self, attr_name))
            for attr_name, chk_name in self.CHECKPOINT_ATTRS.items()}

  def restore_from_snapshot(self, snapshot_state: Mapping[str, Any]) -> None:
    """Puts checkpointed arrays back, replicated over the local devices.

    Raises:
      ValueError: if the model has state and the checkpoint holds none.
    """
    if self.model_has_state and snapshot_state.get('state') is None:
      held = sorted(k for k, v in snapshot_state.items() if v is not None)
      raise ValueError(
          "This model has state (BatchNorm's moving averages) but the "
          f'checkpoint has none (only {held}): it was written for a '
          'stateless model, or by a tool that drops the state.')
    for attr_name, chk_name in self.CHECKPOINT_ATTRS.items():
      value = snapshot_state[chk_name]
      template = getattr(self, attr_name)
      if template is not None:
        value = tree_io.restore_structure(
            jaxline.utils.get_first(template), value)
      elif attr_name == '_opt_state':
        value = tree_io.restore_structure(
            self._optimizer.init(snapshot_state['params']), value)
      setattr(self, attr_name, parallel.replicate(value))


def _all_finite(tree: Any) -> jax.Array:
  """Whether every element of every floating-point leaf is finite (a bool
  scalar; integer leaves, such as optimizer counters, always are)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(path, simple=True, separator='/'):
          tuple(np.shape(x))
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _differences(what: str, want: Any, got: Any) -> list[str]:
  """Lines naming entries of `want` missing from `got`, extra, or of
  other shapes ('name: checkpoint [...] vs model [...]')."""
  want, got = _flat_shapes(want), _flat_shapes(got)
  lines = [f'{what} missing from the checkpoint: {name} {list(want[name])}'
           for name in sorted(set(want) - set(got))]
  lines += [f'{what} in the checkpoint but not in the model: {name} '
            f'{list(got[name])}' for name in sorted(set(got) - set(want))]
  lines += [f'{what} of another shape: {name}: checkpoint '
            f'{list(got[name])} vs model {list(want[name])}'
            for name in sorted(set(want) & set(got))
            if want[name] != got[name]]
  return lines
