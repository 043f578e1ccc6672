"""Timing, FLOP-rate and memory measurements for scripts/benchmark.py.

MFU (model FLOP utilisation) = achieved FLOP/s of a step / the peak FLOP/s of
this machine, where both are measured in the same process: the step's FLOPs
are counted from its traced jaxpr (perceiver_jax.flops; the formulation that
actually runs, forward and backward), and the peak is the best rate of a
large matmul (float32 on CPU, bfloat16 on accelerators).
"""

import ast
import copy
import difflib
import functools
import gc
import resource
import statistics
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from perceiver_jax.analysis import flops as flops_lib
from perceiver_jax.analysis import memory
from perceiver_jax.backends.cpu import attention as cpu_attention
from perceiver_jax.backends.cpu import matmul as cpu_matmul
from perceiver_jax.modules import perceiver
from perceiver_jax.perf import profiling
from perceiver_jax.training import precision


def time_calls(fn: Callable[[], Any], *, warmup: int = 2, steps: int = 10
               ) -> list[float]:
  """Seconds per call of `fn` (blocking on its result), after warm-up."""
  return time_alternating({'fn': fn}, warmup=warmup, steps=steps)['fn']


def summarize_times(times: list[float]) -> dict[str, float]:
  quartiles = np.percentile(times, [25, 75])
  return {'median_s': statistics.median(times), 'min_s': min(times),
          'max_s': max(times), 'iqr_s': float(quartiles[1] - quartiles[0]),
          'num_timed_steps': len(times)}


def peak_flops(size: Optional[int] = None, steps: int = 10) -> dict[str, Any]:
  """Best FLOP/s of a square matmul: float32 on CPU, bfloat16 elsewhere."""
  on_cpu = jax.default_backend() == 'cpu'
  size = size or (2048 if on_cpu else 8192)
  dtype = jnp.float32 if on_cpu else jnp.bfloat16
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  times = time_calls(lambda: matmul(a, b), warmup=2, steps=steps)
  return {'peak_flops': 2 * size**3 / min(times),
          'peak_matmul': f'{size}x{size} {jnp.dtype(dtype).name}'}


def best_peak(*peaks: dict[str, Any]) -> dict[str, Any]:
  """The best of several `peak_flops` measurements (taken before and after
  the timed steps: the machine's speed drifts, and the best is the bound)."""
  best = max(peaks, key=lambda p: p['peak_flops'])
  return {**best, 'peak_flops_measured': [p['peak_flops'] for p in peaks]}


def add_mfu(result: dict[str, Any], peak: dict[str, Any]) -> None:
  """Adds the peak and MFU to a `benchmark` result, or to each entry of a
  `compare` result, that has an achieved FLOP rate."""
  for record in [result] + [v for v in result.values() if isinstance(v, dict)]:
    if 'achieved_flops' in record:
      record.update(peak)
      record['mfu'] = record['achieved_flops'] / peak['peak_flops']


def process_peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def minor_page_faults() -> int:
  """Page faults of this process so far that needed no disk I/O: mostly
  first touches of freshly mapped memory (see host_memory)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def device_memory(compiled) -> dict[str, int]:
  """XLA's buffer plan of a compiled step, and device stats if available."""
  out = {}
  analysis = compiled.memory_analysis()
  if analysis is not None:
    out['xla_temp_bytes'] = int(analysis.temp_size_in_bytes)
    out['xla_total_bytes'] = int(
        analysis.temp_size_in_bytes + analysis.argument_size_in_bytes +
        analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
  stats = jax.local_devices()[0].memory_stats()
  if stats and 'peak_bytes_in_use' in stats:
    out['device_peak_bytes'] = int(stats['peak_bytes_in_use'])
  return out


def make_step(experiment_config: ml_collections.ConfigDict, mode: str,
              batch_size: int) -> tuple[Callable[..., Any], tuple[Any, ...]]:
  """A jitted forward or train step of the config's model on random data.

  The config's `training.precision` policy is set (process-wide, as the
  experiment sets it) and applies when the step is traced.

  Returns:
    (step, args): `step(*args)` runs once; the train step donates its params
    and optimizer state and returns the new ones.
  """
  precision.apply_policy(
      precision.resolve(experiment_config.training.precision,
                        jax.devices()[0].platform), [perceiver.Perceiver])
  forward, optimizer, train_step = memory.make_train_step(experiment_config)
  shape = experiment_config.data.input_shape
  rng = jax.random.key(0)

  def make_input(s, key):
    return jax.random.uniform(key, (batch_size,) + tuple(s), jnp.float32)

  if hasattr(shape, 'items'):
    keys = jax.random.split(rng, len(shape))
    inputs = {k: make_input(v, key)
              for (k, v), key in zip(sorted(shape.items()), keys)}
  else:
    inputs = make_input(shape, rng)
  num_classes = experiment_config.data.num_classes
  labels = jax.random.randint(rng, (batch_size,), 0, num_classes)
  # Jitted: run eagerly, init would hold every activation of a forward pass
  # and its peak would stand in for the step's in the process RSS.
  params = jax.jit(functools.partial(forward.init, is_training=mode == 'train')
                   )(rng, inputs)
  if mode == 'forward':
    fn = jax.jit(lambda p, x: forward.apply(p, None, x, is_training=False))
    return fn, (params, inputs)
  return (jax.jit(train_step, donate_argnums=(0, 1)),
          (params, optimizer.init(params), inputs, labels, rng))


def compile_step(experiment_config: ml_collections.ConfigDict, mode: str,
                 batch_size: int,
                 compiler_options: Optional[Mapping[str, Any]] = None
                 ) -> tuple[Callable[[], Any], dict[str, Any]]:
  """Compiles the config's step; returns (run, measurements before running).

  `run()` runs one step (a train step carries its parameters and optimizer
  state to the next call); `run.compiled` is the compiled step. The
  measurements are compile_s, flops_per_step, cpu_matmul_calls (products
  compiled to the CPU backend's OpenBLAS kernel), cpu_attention_calls
  (forward and backward calls of its fused attention kernels) and the
  memory of `device_memory`. `compiler_options` (XLA debug options such as
  {'xla_cpu_prefer_vector_width': 512}) apply to this compilation only.
  """
  if mode not in ('train', 'forward'):
    raise ValueError(f"mode must be 'train' or 'forward', got {mode!r}.")
  gc.collect()
  step, args = make_step(experiment_config, mode, batch_size)
  step_flops = flops_lib.count_flops(step, *args)
  start = time.perf_counter()
  compiled = step.lower(*args).compile(
      compiler_options=dict(compiler_options) if compiler_options else None)
  compile_s = time.perf_counter() - start
  hlo = compiled.as_text()
  info = dict(compile_s=compile_s, flops_per_step=step_flops,
              cpu_matmul_calls=hlo.count(cpu_matmul.HLO_CALL),
              cpu_attention_calls=sum(
                  hlo.count(call) for call in cpu_attention.HLO_CALLS),
              **device_memory(compiled))
  state = list(args)
  if mode == 'train':
    def run():
      state[0], state[1], loss = compiled(*state)
      return loss
  else:
    def run():
      return compiled(*state)
  run.compiled = compiled
  return run, info


def parse_variant(spec: str) -> tuple[dict[str, str], dict[str, Any]]:
  """Splits a variant, 'key=value key=value ...', into config overrides and
  XLA compiler options.

  Keys starting with 'xla_' are XLA debug options for the variant's
  compilation (values read as bool, int, float or text); the others are
  dotted paths in the experiment config, kept as text for `with_overrides`.

  Raises:
    ValueError: for an empty variant, an item that is not key=value, or a
      key given twice.
  """
  overrides, options = {}, {}
  items = spec.split()
  if not items:
    raise ValueError("empty variant; give key=value items, e.g. "
                     "'model.encoder.cross_attention=direct'.")
  for item in items:
    key, has_value, value = item.partition('=')
    if not has_value or not key:
      raise ValueError(f'{item!r} in variant {spec!r} is not key=value.')
    target = options if key.startswith('xla_') else overrides
    if key in target:
      raise ValueError(f'{key!r} is given twice in variant {spec!r}.')
    target[key] = _option_value(value) if target is options else value
  return overrides, options


def _option_value(text: str) -> Any:
  if text.lower() in ('true', 'false'):
    return text.lower() == 'true'
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def with_overrides(experiment_config: ml_collections.ConfigDict,
                   overrides: Mapping[str, str]) -> ml_collections.ConfigDict:
  """A copy of `experiment_config` with values set from text by dotted key.

  Each value is converted to the type of the one it replaces: bool
  (true/false/1/0), int, float, str, tuple or list (Python syntax); 'none'
  sets None; a key whose value is None takes a Python literal, or the text.

  Raises:
    ValueError: for a key not in the config (naming the closest ones), a
      section given a value, or a value of the wrong type.
  """
  config = copy.deepcopy(experiment_config)
  for key, text in overrides.items():
    names = key.split('.')
    node = config
    for depth, name in enumerate(names):
      if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        where = '.'.join(names[:depth]) or 'the experiment config'
        known = list(node.keys()) if isinstance(
            node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(name, known, n=3)
        hint = f'; did you mean {close}?' if close else (
            f'; it has {sorted(known)}.' if known else
            f' ({where} is a value, not a section).')
        raise ValueError(f'Unknown config key {key!r}: {where} has no '
                         f'{name!r}{hint}')
      if depth < len(names) - 1:
        node = node[name]
    if isinstance(node[names[-1]], ml_collections.ConfigDict):
      raise ValueError(f'{key!r} is a config section, not a value.')
    node[names[-1]] = _config_value(key, text, node[names[-1]])
  return config


def _config_value(key: str, text: str, old: Any) -> Any:
  """`text` as a value of the type of `old`, for `with_overrides`."""
  if text.lower() == 'none':
    return None
  wrong = ValueError(f'{key}={text!r}: expected {type(old).__name__} '
                     f'(it is {old!r}).')
  if isinstance(old, bool):
    if text.lower() not in ('true', 'false', '1', '0'):
      raise wrong
    return text.lower() in ('true', '1')
  if isinstance(old, str):
    return text
  try:
    if isinstance(old, (int, float)):
      return type(old)(text)
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if old is None:
      return text
    raise wrong from None
  if old is not None and not isinstance(value, type(old)):
    raise wrong
  return value


def profile(experiment_config: ml_collections.ConfigDict, *, mode: str,
            batch_size: int, steps: int = 3) -> dict[str, Any]:
  """Where the step's time goes, per module and pass: `profiling.profile_step`
  after warm-up, with the step's FLOPs as counted from its jaxpr."""
  run, info = compile_step(experiment_config, mode, batch_size)
  time_calls(run, warmup=1, steps=0)  # profile_step runs a second one.
  result = profiling.profile_step(run, run.compiled.as_text(), steps=steps)
  result.update(mode=mode, batch_size=batch_size,
                flops_per_step=info['flops_per_step'])
  return result


def benchmark(experiment_config: ml_collections.ConfigDict, *, mode: str,
              batch_size: int, steps: int = 10,
              peak: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """Times one configuration; returns the JSON-ready measurements."""
  run, info = compile_step(experiment_config, mode, batch_size)
  time_calls(run, warmup=2, steps=0)
  faults = minor_page_faults()
  result = summarize_times(time_calls(run, warmup=0, steps=steps))
  result['page_faults_per_step'] = (minor_page_faults() - faults) / steps
  result.update(mode=mode, batch_size=batch_size, **info)
  result.update(_rates(result['median_s'], batch_size, info['flops_per_step']))
  if peak is not None:
    add_mfu(result, peak)
  result['process_peak_rss_bytes'] = process_peak_rss_bytes()
  result['backend'] = jax.default_backend()
  result['device'] = jax.local_devices()[0].device_kind
  return result


def _rates(median_s: float, batch_size: int,
           flops_per_step: Optional[float]) -> dict[str, float]:
  """examples/s and achieved FLOP/s of a step taking `median_s`."""
  out = {'examples_per_s': batch_size / median_s}
  if flops_per_step is not None:
    out['achieved_flops'] = flops_per_step / median_s
  return out


def time_alternating(fns: dict[str, Callable[[], Any]], *, warmup: int = 2,
                     steps: int = 10) -> dict[str, list[float]]:
  """Seconds per call of each function, the functions taking turns call by
  call (after `warmup` calls each), so that drifts of the machine's speed
  reach them all alike; every other round runs them in reverse order, so
  that none always follows the same one. `fn()` may return a JAX or torch
  value; JAX values are waited for."""
  times = {name: [] for name in fns}
  names = list(fns)
  for i in range(warmup + steps):
    for name in names if i % 2 == 0 else reversed(names):
      start = time.perf_counter()
      jax.block_until_ready(fns[name]())
      if i >= warmup:
        times[name].append(time.perf_counter() - start)
  return times


def compare(runs: dict[str, tuple[Callable[[], Any], dict[str, Any]]], *,
            mode: str, batch_size: int, steps: int = 10,
            peak: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """Times several implementations of one step, taking turns call by call.

  Args:
    runs: name -> (run, info), `info` as from `compile_step` (FLOPs and
      memory where known). The first entry is the reference: the result
      holds `<first>_over_<name>`, its median time over each other's, and
      `<first>_over_<name>_paired`, the median of the per-round ratios (the
      two calls of a round run back to back, so the machine's drift between
      rounds cancels), with their quartiles in `..._paired_iqr`.

  Returns:
    JSON-ready: per name the timing summary, info and rates; the ratios.
  """
  times = time_alternating({k: run for k, (run, _) in runs.items()},
                           steps=steps)
  result = {'mode': mode, 'batch_size': batch_size}
  for name, (_, info) in runs.items():
    entry = summarize_times(times[name])
    entry.update(info)
    entry.update(_rates(entry['median_s'], batch_size,
                        info.get('flops_per_step')))
    result[name] = entry
  first, *others = runs
  for name in others:
    result[f'{first}_over_{name}'] = (result[first]['median_s'] /
                                      result[name]['median_s'])
    ratios = [a / b for a, b in zip(times[first], times[name])]
    result[f'{first}_over_{name}_paired'] = statistics.median(ratios)
    result[f'{first}_over_{name}_paired_iqr'] = [
        float(q) for q in np.percentile(ratios, [25, 75])]
  if peak is not None:
    add_mfu(result, peak)
  result['process_peak_rss_bytes'] = process_peak_rss_bytes()
  return result


def growth(records: list[dict[str, Any]]) -> dict[str, float]:
  """Least-squares slopes against M (`num_inputs`) of an input sweep's times
  and memory: seconds and bytes per input element."""
  m = np.array([r['num_inputs'] for r in records], np.float64)
  slopes = {}
  for key in ('median_s', 'process_peak_rss_bytes', 'xla_temp_bytes',
              'device_peak_bytes'):
    if len(records) > 1 and all(key in r for r in records):
      values = np.array([r[key] for r in records], np.float64)
      slopes[f'{key}_per_input'] = float(np.polyfit(m, values, 1)[0])
  return slopes
