r"""Prints the top-5 ImageNet classes of image files, one JSON line each.

  python scripts/classify.py --config=configs/imagenet.py:p2 \
      --checkpoint=/tmp/perceiver_jax/p2_deepmind dog.jpg cat.png

The command form of DeepMind's ImageNet colab: with a checkpoint imported by
scripts/import_checkpoint.py it prints the released model's predictions.
Each line is

  {"image": "dog.jpg", "top_k": [{"class": 251, "prob": 0.93,
   "id": "n02110341", "name": "dalmatian, coach dog, carriage dog"}, ...]}

most probable first, with softmax probabilities over the 1,000 classes.

Images (JPEG, PNG, GIF's first frame, BMP; local or gs://) are preprocessed
exactly as the config's evaluation preprocesses ImageNet
(perceiver_jax/data/imagenet.py `load_eval_image`: the centre 224/256 of the
short side, bicubic resize, mean/std normalisation, as DeepMind's released
evaluation). Every image is read before the checkpoint, so a missing or
undecodable file fails at once, naming it; errors print one line and exit
with status 1. The work is perceiver_jax/classify.py's `classify`.

--checkpoint is a checkpoint root (its newest complete step), a series or a
step directory, as for scripts/evaluate.py. Only configs whose data are
ImageNet with 1,000 classes are accepted: their preprocessing and class
names are the ones this script knows; others are refused with a message.
A model with BatchNorm (p2,prep=conv) runs on the checkpoint's saved model
state. Names and WordNet ids come from perceiver_jax/data/
imagenet2012_labels.txt (perceiver_jax/data/imagenet_labels.py). The model
runs in float32 on the default JAX device. --top_k sets how many
classes to print. --verbosity=0 (-v 0) adds the INFO lines of orbax, absl,
JAX and TensorFlow (see perceiver_jax/training/logs.py).
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

from perceiver_jax import classify

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Checkpoint path.')
_TOP_K = flags.DEFINE_integer('top_k', 5, 'Classes printed per image.')


def main(argv):
  logs.configure()
  try:
    results = classify.classify(_CONFIG.value, _CHECKPOINT.value, argv[1:],
                                k=_TOP_K.value)
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    sys.exit(f'classify.py: {e}')
  for result in results:
    print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'checkpoint'])
  app.run(main)
