r"""Prints a model's size and cost as one JSON line, without running it.

  python scripts/model_summary.py --config=configs/imagenet.py[:preset]

Fields: params (count), params_m (millions), forward_flops (per example,
2 per multiply-add of every matrix product, from the traced jaxpr), gflops,
byte_array ([M, C] fed to the encoder) and num_latents x latent_dim. Uses
jax.eval_shape / make_jaxpr only, so paper-scale models take seconds on CPU.
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags

from perceiver_jax.analysis import summary

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')


def main(argv):
  del argv
  print(json.dumps(summary.summarize(_CONFIG.value.experiment_kwargs.config)))


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
