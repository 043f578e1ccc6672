r"""Prints a model's size, cost and training memory as one JSON line.

  python scripts/model_summary.py --config=configs/imagenet.py[:preset] \
      [--batch_size=16] [--platform=tpu] [--capacity_gib=16]

Fields: model (type: perceiver, or P1's baselines resnet / vit /
transformer, e.g. --config=configs/imagenet.py:baseline=resnet50), params
(count), params_m (millions), forward_flops (per example, 2 per
multiply-add of every matrix product and convolution, from the traced
jaxpr), gflops, byte_array ([M, C] fed to the encoder or the baseline) and,
for a Perceiver, latents (num_latents x latent_dim). Uses
jax.eval_shape / make_jaxpr only, so paper-scale models take seconds on CPU.

--batch_size adds training_memory: bytes per device of one training step at
that per-device batch on --platform (default: this machine's), in the
compute dtype training.precision gives there. On this machine's platform it
is XLA's plan for the compiled step; on another it is the estimate of
perceiver_jax/analysis/memory.py (an upper bound in practice).
--capacity_gib adds largest_batch: the largest per-device batch whose
memory fits in that many GiB. Remat is a config field:
--config.experiment_kwargs.config.model.encoder.remat=True.
"""

import json

from perceiver_jax.training import logs

# Before XLA loads: it reads its C++ log level once.
logs.quiet_native_logs()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from ml_collections import config_flags

from perceiver_jax.analysis import memory
from perceiver_jax.analysis import summary

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', None, 'Per-device batch for training_memory.')
_PLATFORM = flags.DEFINE_enum(
    'platform', None, memory.PLATFORMS,
    'Platform of training_memory (default: this machine\'s).')
_CAPACITY_GIB = flags.DEFINE_float(
    'capacity_gib', None, 'Device memory for largest_batch, in GiB.')


def main(argv):
  del argv
  logs.configure()
  config = _CONFIG.value.experiment_kwargs.config
  result = summary.summarize(config)
  platform = _PLATFORM.value or memory.local_platform()
  if _BATCH_SIZE.value is not None:
    result['training_memory'] = memory.training_memory(
        config, _BATCH_SIZE.value, platform).as_dict()
  if _CAPACITY_GIB.value is not None:
    at = (memory.compiled_fn(config) if platform == memory.local_platform()
          else memory.estimate_fn(config, platform))
    result['largest_batch'] = {
        'platform': platform, 'capacity_gib': _CAPACITY_GIB.value,
        'batch_size': memory.largest_batch(
            at, int(_CAPACITY_GIB.value * memory.GiB))}
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
