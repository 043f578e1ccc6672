r"""Draws where each latent attends in an image, per cross-attend (P1 Fig. 4).

  python scripts/attention_maps.py --config=configs/digits.py \
      --checkpoint=/tmp/perceiver_jax/digits --image=digit.png \
      --out=/tmp/attention_maps

Writes, for every cross-attend k of the encoder (P1 models: several, in
schedule order, shared ones once per use; P2: one):
  cross_attend_{k}_latents.png  a grid of the chosen latents' maps over the
                                image grid, each scaled to its own maximum;
  cross_attend_{k}_mean.png     the input image beside the map averaged over
                                all latents;
and overview.png (one row per cross-attend), attention.npz (the weights,
[heads, N, h, w] per cross-attend) and maps.json (the list of files); the
listing is also printed as one JSON line. Maps of a permuted model are
drawn on the un-permuted image grid. --latents=0,5,9 picks the latents of
the grids (default: all, or 64 evenly spaced when there are more).

The image is preprocessed as the config's evaluation does (ImageNet: the
224/256 centre crop; digits: greyscale resized to 8 x 8 in [0, 1]). Errors
(a missing or undecodable image, a config whose model is not an image model,
e.g. AudioSet's, a checkpoint of another model) print one line and exit with
status 1. The work is perceiver_jax/analysis/attention_maps.py's.

docs/images/digits_attention.png is the overview.png of the default digits
model (configs/digits.py, 1,000 steps; 4 min 49 s wall, 1 min 49 s user CPU
on a shared 2-core machine) on the first test image (a '2'):

  python scripts/train.py --config=configs/digits.py
  python scripts/attention_maps.py --config=configs/digits.py \
      --checkpoint=/tmp/perceiver_jax/digits --image=digit.png \
      --out=/tmp/attention_maps

with digit.png that image saved as an 8 x 8 greyscale PNG
(tests/analysis/test_attention_maps.py `_digit_png`). Rows: cross-attend 0
and 1; in each, the image, the map averaged over the 32 latents, and each
latent's map.
"""

import json
import sys

from perceiver_jax.training import logs

# Before TensorFlow and XLA load: they read their C++ log level once.
logs.quiet_native_logs()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from ml_collections import config_flags

from perceiver_jax.analysis import attention_maps

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Checkpoint path.')
_IMAGE = flags.DEFINE_string('image', None, 'Image file.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_LATENTS = flags.DEFINE_list('latents', None,
                             'Latent indices drawn in the grids.')


def main(argv):
  del argv
  logs.configure()
  try:
    latents = [int(i) for i in _LATENTS.value] if _LATENTS.value else None
    listing = attention_maps.write_attention_maps(
        _CONFIG.value, _CHECKPOINT.value, _IMAGE.value, _OUT.value,
        latents=latents)
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    sys.exit(f'attention_maps.py: {e}')
  print(json.dumps(listing))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'checkpoint', 'image', 'out'])
  app.run(main)
