r"""The accelerator check: P1 and P2 ImageNet training steps in bf16.

  python scripts/device_check.py --out=runs/device_check.json \
      [--budget_s=420] [--profile_dir=runs/device_profile]

For P1 ImageNet (configs/imagenet.py, 224x224, 50,176 inputs) and P2
(configs/imagenet.py:p2), in bfloat16 on the first device, with the
platform's kernels (model.backend='auto': cuDNN or Pallas flash attention)
and with the reference ops: doubles the per-device batch from 8 until a
step no longer fits in memory (or the time budget ends) and times
--steps steps at each size. Writes one JSON document: per run the batch,
median step time, examples/s, model TFLOP/s, MFU against the device's
listed peak (perceiver_jax/training/throughput.py), XLA's memory plan, and
the best (largest fitting) batch, and at the first batch the memory
estimate of perceiver_jax/analysis/memory.py beside XLA's plan (how far off
the estimate used for platforms a machine does not have is). With --profile_dir, traces three steps of
the first preset at its best batch with jax.profiler (open it in TensorBoard or Perfetto).

scripts/device_check.sh runs it with the limits the project's device check
has (under 8 minutes on one GPU).
"""

import json
import statistics
import time

from absl import app
from absl import flags
import jax

from configs import imagenet
from perceiver_jax.analysis import memory
from perceiver_jax.perf import benchmarking
from perceiver_jax.training import throughput

_OUT = flags.DEFINE_string('out', 'device_check.json', 'JSON output path.')
_BUDGET = flags.DEFINE_float('budget_s', 420.0,
                             'Stop starting new runs after this many s.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per run.')
_MAX_BATCH = flags.DEFINE_integer('max_batch', 256,
                                  'Largest per-device batch tried.')
_PRESETS = flags.DEFINE_list(
    'presets', ['default', 'p2'],
    "configs/imagenet.py presets to run ('default': P1 ImageNet).")
_PROFILE_DIR = flags.DEFINE_string('profile_dir', None,
                                   'Trace P1 at its best batch here.')


def _is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower()


def _run(experiment_config, batch: int, steps: int) -> dict:
  """Compiles and times one training step configuration."""
  run, info = benchmarking.compile_step(experiment_config, 'train', batch)
  for _ in range(2):
    jax.block_until_ready(run())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  device = jax.devices()[0]
  return {'batch': batch, 'median_step_s': median,
          'examples_per_sec': batch / median,
          'compile_s': info['compile_s'],
          'flops_per_step': info['flops_per_step'],
          **throughput.step_metrics(info['flops_per_step'], 1 / median,
                                    device),
          **{k: v for k, v in info.items() if 'bytes' in k}}


def main(argv):
  del argv
  start = time.time()
  device = jax.devices()[0]
  report = {'device': device.device_kind, 'platform': device.platform,
            'jax': jax.__version__,
            'peak_flops': throughput.peak_flops(device), 'configs': {}}
  for name in _PRESETS.value:
    preset = None if name == 'default' else name
    for backend in ('auto', 'reference'):
      exp = imagenet.get_config(preset).experiment_kwargs.config
      with exp.unlocked():
        exp.training.precision = 'bfloat16'
        exp.model.backend = backend
      runs, batch = [], 8
      while batch <= _MAX_BATCH.value and time.time() - start < _BUDGET.value:
        try:
          runs.append(_run(exp, batch, _STEPS.value))
        except Exception as e:  # pylint: disable=broad-except
          if not _is_out_of_memory(e):
            raise
          runs.append({'batch': batch, 'out_of_memory': True})
          break
        print(json.dumps({name: backend, **runs[-1]}), flush=True)
        batch *= 2
      fitting = [r for r in runs if not r.get('out_of_memory')]
      report['configs'][f'{name}_{backend}'] = {
          'runs': runs, 'best': max(fitting, key=lambda r: r['batch'])
          if fitting else None}
      if (backend == 'auto' and fitting and 'xla_total_bytes' in fitting[0]
          and time.time() - start < _BUDGET.value):
        estimate = memory.estimated_memory(exp, fitting[0]['batch'],
                                           memory.local_platform())
        report['configs'][f'{name}_{backend}']['memory_estimate'] = {
            **estimate.as_dict(), 'over_compiled': estimate.total /
            fitting[0]['xla_total_bytes']}
        print(json.dumps({name: 'memory_estimate', **report['configs'][
            f'{name}_{backend}']['memory_estimate']}), flush=True)
  first = _PRESETS.value[0]
  best = report['configs'][f'{first}_auto']['best']
  if _PROFILE_DIR.value and best:
    exp = imagenet.get_config(
        None if first == 'default' else first).experiment_kwargs.config
    with exp.unlocked():
      exp.training.precision = 'bfloat16'
    run, _ = benchmarking.compile_step(exp, 'train', best['batch'])
    jax.block_until_ready(run())
    with jax.profiler.trace(_PROFILE_DIR.value):
      for _ in range(3):
        jax.block_until_ready(run())
    report['profile_dir'] = _PROFILE_DIR.value
  report['wall_s'] = time.time() - start
  with open(_OUT.value, 'w') as f:
    json.dump(report, f, indent=1)
  print(json.dumps({'written': _OUT.value, 'wall_s': report['wall_s']}))


if __name__ == '__main__':
  app.run(main)
