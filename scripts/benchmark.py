r"""Benchmarks a config's training or forward step; prints one JSON line.

  python scripts/benchmark.py --config=configs/imagenet.py:bench_a --mode=train
  python scripts/benchmark.py --config=configs/imagenet.py:bench_b \
      --mode=forward --batch=8 --steps=20
  python scripts/benchmark.py --config=configs/imagenet.py:bench_a \
      --sweep-inputs=32,64,128,256          # one JSON line per image size
  python scripts/benchmark.py --config=configs/imagenet.py:bench_a \
      --cross_attention=direct              # the unreformulated model
  python scripts/benchmark.py --config=configs/imagenet.py:bench_a \
      --compare=hf                          # vs HuggingFace's PyTorch model
  python scripts/benchmark.py --config=configs/imagenet.py:bench_a \
      --profile=3                           # where the time goes, per module
  python scripts/benchmark.py --config=configs/imagenet.py:bench_b \
      --against='model.encoder.cross_attention_chunk_size=2048' \
      --against='xla_cpu_prefer_vector_width=512'   # paired A/B in one process

Reports the median step time and its spread over --steps timed steps after
warm-up, examples/sec, compile time, FLOPs per step (2 per multiply-add,
counted from the traced step: forward + backward + optimizer for train),
achieved FLOP/s, MFU against the matmul peak measured in the same run (the
best of a measurement before and one after the timed steps), and
memory: XLA's buffer plan of the compiled step (exact), device peak where
available, and the process's peak RSS; page faults per timed step. Each
point of an input sweep runs in a fresh process so its RSS is its own. The
script restarts itself once with the malloc settings of
PERCEIVER_JAX_MALLOC (perceiver_jax/perf/host_memory; `huge_page_malloc` and
`keep_freed_memory` in the output say which it ran with).

--profile=N traces N steps with jax.profiler instead of timing them and
reports, per model module and pass (forward, backward, other: the optimizer),
the time per step, its share, and the FLOPs and FLOP rate of the matrix
products run (perceiver_jax/profiling.py).

--compare=hf (needs `pip install -e '.[compare]'`) builds HuggingFace's
PerceiverForImageClassificationFourier at the config's sizes
(perceiver_jax/hf_reference.py says what differs) and times its forward and
training steps against ours, the two taking turns step by step; it prints one
JSON line per mode with `ours_over_hf`, our median step time over HF's. HF's
MFU counts the FLOPs of our model in the direct formulation, the one HF runs.
It runs without huge-page malloc, for both frameworks alike.

--against=VARIANT (repeatable) compiles the step once as configured (the
baseline) and once per variant, all in this process, and times them taking
turns step by step (the order reversed every other round); one JSON line
with each one's measurements and `baseline_over_<variant>_paired`, the
median over rounds of baseline time / variant time (> 1: the variant is
faster), with its quartiles. On a machine whose speed drifts between runs
(this project's 2-core VMs: 10-20% within minutes) this is the comparison to
trust; separate runs are not. A variant is 'key=value key=value ...': dotted
keys of the experiment config (e.g. `model.encoder.cross_attention=direct`,
`training.precision=bfloat16`), and XLA options (`xla_...=value`) for that
variant's compilation only. All variants run the same batch (--batch).
"""

import json
import os
import subprocess
import sys

from perceiver_jax.perf import host_memory

# First of all, before the heavy imports: this may restart the process.
# Not for --compare: the two frameworks' steps alternate, and each one's freed
# huge pages sit idle long enough for a VM's host to take them back (see
# host_memory), so every step faults them in again slowly (bench_a training:
# ours 1.19 s per step instead of 0.86 s, HF's 1.06 s instead of 1.04 s).
# Not for --sweep-inputs either: it runs no step itself, and its points
# choose their own settings (see _sweep).
if __name__ == '__main__' and not any(
    a.startswith(('--compare', '--sweep-inputs')) for a in sys.argv[1:]):
  host_memory.reexec_with_malloc_settings()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from ml_collections import config_flags

from perceiver_jax.analysis import flops as flops_lib
from perceiver_jax.perf import benchmarking
from perceiver_jax.perf import profiling

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'forward'], 'Step.')
_BATCH = flags.DEFINE_integer('batch', None,
                              'Batch size (default: the config\'s).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps after warm-up.')
_SWEEP = flags.DEFINE_list(
    'sweep-inputs', None, 'Image sizes to sweep (e.g. 32,64,128,256); '
    'image configs only.')
_IMAGE_SIZE = flags.DEFINE_integer(
    'image_size', None, 'Run at this image size (used by --sweep-inputs).')
_CROSS = flags.DEFINE_enum(
    'cross_attention', None, ['auto', 'direct', 'reformulated'],
    'Override the encoder\'s cross-attention formulation.')
_CHUNK = flags.DEFINE_integer(
    'chunk_size', None, 'Override the cross-attention chunk size (0: off).')
_PRECISION = flags.DEFINE_enum('precision', None,
                               ['auto', 'float32', 'bfloat16'],
                               'Override the compute precision.')
_PROFILE = flags.DEFINE_integer(
    'profile', None, 'Instead of timing: trace this many steps and print '
    'where the time goes, per module and pass (a table on stderr, JSON on '
    'stdout).')
_AGAINST = flags.DEFINE_multi_string(
    'against', None, "A variant to time against the configured step, taking "
    "turns: 'key=value ...' with keys of the experiment config (dotted) or "
    'XLA options (xla_...). Repeatable.')
_COMPARE = flags.DEFINE_enum(
    'compare', None, ['hf'], 'Also time this implementation, taking turns '
    'with ours, in both modes (--mode is ignored).')


def _apply_overrides(exp) -> None:
  with exp.unlocked():
    if _IMAGE_SIZE.value:
      size = _IMAGE_SIZE.value
      exp.data.input_shape = (size, size, exp.data.input_shape[-1])
      exp.model.preprocessor.max_resolution = (size, size)
    if _CROSS.value:
      exp.model.encoder.cross_attention = _CROSS.value
    if _CHUNK.value is not None:
      exp.model.encoder.cross_attention_chunk_size = _CHUNK.value or None
    if _PRECISION.value:
      exp.training.precision = _PRECISION.value


def _sweep(argv) -> None:
  """Re-runs this script once per image size, each in a fresh process.

  The points run with PERCEIVER_JAX_MALLOC=huge_pages unless it is set: with
  freed memory kept in the process ('keep'), the peak RSS is the heap's
  high-water mark, fragments included, which swung by hundreds of MB between
  sizes (bench_a training: RSS slopes of -5 to 80 KB per input element,
  where XLA's buffer plan grows by 8-26 KB), not what the step needs.
  """
  passthrough = [a for a in argv[1:] if not a.startswith('--sweep-inputs')]
  env = dict(os.environ)
  env.setdefault(host_memory.MODE_VARIABLE, 'huge_pages')
  records = []
  for size in _SWEEP.value:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *passthrough,
         f'--image_size={size}'], check=True, capture_output=True, text=True,
        env=env)
    line = out.stdout.strip().splitlines()[-1]
    record = json.loads(line)
    size = int(size)
    record['image_size'] = size
    record['num_inputs'] = size * size
    records.append(record)
    print(json.dumps(record), flush=True)
  print(json.dumps({'sweep_growth': benchmarking.growth(records)}),
        flush=True)


def _compare_hf(exp, batch_size: int, peaks: list[dict]) -> None:
  """Ours against HF's PyTorch Perceiver, forward then train: JSON lines."""
  import jax
  from perceiver_jax.perf import hf_reference
  from perceiver_jax.training import precision
  if precision.resolve(exp.training.precision,
                       jax.devices()[0].platform) != 'float32':
    raise ValueError('--compare=hf runs float32 only.')
  direct = benchmarking.with_overrides(
      exp, {'model.encoder.cross_attention': 'direct',
            'model.encoder.cross_attention_chunk_size': 'none'})
  for mode in ('forward', 'train'):
    step, args = benchmarking.make_step(direct, mode, batch_size)
    hf_info = {'flops_per_step': flops_lib.count_flops(step, *args),
               'flops_counted_as': 'ours, direct formulation'}
    del step, args
    runs = {'ours': benchmarking.compile_step(exp, mode, batch_size),
            'hf': (hf_reference.make_step(exp, mode, batch_size), hf_info)}
    result = benchmarking.compare(runs, mode=mode, batch_size=batch_size,
                                  steps=_STEPS.value)
    peaks.append(benchmarking.peak_flops())
    benchmarking.add_mfu(result, benchmarking.best_peak(*peaks))
    result['config'] = _config_arg()
    result['torch_threads'] = hf_reference.num_threads()
    result.update(_malloc_settings())
    print(json.dumps(result), flush=True)
    del runs


def _malloc_settings() -> dict:
  """What glibc's malloc ran with (see perceiver_jax/perf/host_memory)."""
  return {'huge_page_malloc': host_memory.huge_pages_requested(),
          'keep_freed_memory': host_memory.keeps_freed_memory()}


def _parse_against(exp) -> dict:
  """--against's variants: name -> (config, overrides, XLA options)."""
  variants = {}
  for spec in _AGAINST.value:
    name = ' '.join(spec.split())
    try:
      overrides, options = benchmarking.parse_variant(spec)
      config = benchmarking.with_overrides(exp, overrides)
    except ValueError as e:
      raise app.UsageError(f'--against={spec!r}: {e}') from None
    if name in variants:
      raise app.UsageError(f'--against={spec!r} is given twice.')
    variants[name] = config, overrides, options
  return variants


def _against(exp, variants: dict, batch_size: int, peak: dict) -> None:
  """The configured step against each --against variant, taking turns."""
  runs = {'baseline': benchmarking.compile_step(exp, _MODE.value, batch_size)}
  for name, (config, overrides, options) in variants.items():
    # make_step sets each variant's dtype policy before it is traced.
    run, info = benchmarking.compile_step(config, _MODE.value, batch_size,
                                          compiler_options=options)
    info.update(overrides=overrides, compiler_options=options)
    runs[name] = run, info
  result = benchmarking.compare(runs, mode=_MODE.value, batch_size=batch_size,
                                steps=_STEPS.value)
  benchmarking.add_mfu(
      result, benchmarking.best_peak(peak, benchmarking.peak_flops()))
  result['config'] = _config_arg()
  result.update(_malloc_settings())
  print(json.dumps(result), flush=True)


def _config_arg() -> str:
  return next(
      (a.split('=', 1)[1] for a in sys.argv if a.startswith('--config=')), '')


def main(argv):
  if _SWEEP.value:
    _sweep(sys.argv)
    return
  exp = _CONFIG.value.experiment_kwargs.config
  _apply_overrides(exp)
  batch_size = _BATCH.value or exp.training.batch_size
  if _AGAINST.value and (_COMPARE.value or _PROFILE.value is not None):
    raise app.UsageError('--against does not go with --compare or --profile.')
  variants = _parse_against(exp) if _AGAINST.value else None
  if _PROFILE.value is not None:
    if _PROFILE.value < 1 or _COMPARE.value:
      raise app.UsageError('--profile takes a number of steps >= 1 and does '
                           'not go with --compare.')
    result = benchmarking.profile(exp, mode=_MODE.value,
                                  batch_size=batch_size, steps=_PROFILE.value)
    print(profiling.format_table(result), file=sys.stderr, flush=True)
    result['config'] = _config_arg()
    print(json.dumps(result), flush=True)
    return
  peak = benchmarking.peak_flops()
  if variants:
    _against(exp, variants, batch_size, peak)
    return
  if _COMPARE.value == 'hf':
    _compare_hf(exp, batch_size, [peak])
    return
  result = benchmarking.benchmark(
      exp, mode=_MODE.value, batch_size=batch_size, steps=_STEPS.value)
  benchmarking.add_mfu(
      result, benchmarking.best_peak(peak, benchmarking.peak_flops()))
  result['config'] = _config_arg()
  result['precision'] = exp.training.precision
  result['cross_attention'] = exp.model.encoder.get('cross_attention', 'auto')
  result.update(_malloc_settings())
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
