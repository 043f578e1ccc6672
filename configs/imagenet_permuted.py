r"""Permuted ImageNet: P1 Tab. 2, the Perceiver rows.

One fixed permutation (seed PERMUTATION_SEED, recorded here) of the 50,176
flattened pixels is applied AFTER the position features are attached, for
training and evaluation alike, on every host. A Perceiver with Fourier
features sees a set, so it scores as on plain ImageNet.

  pos=fourier  P1 "Perceiver (FF)": the configs/imagenet.py model; 78.0%
               expected (= unpermuted).
  pos=learned  P1 "Perceiver (learned pos.)": a learned 128-dim position
               encoding per pixel (truncated normal, init scale 1.0) instead
               of Fourier features (RGB + 128 = 131 channels), ONE cross-attend
               (8 were unstable in P1); 70.9% expected.

  python scripts/train.py --config=configs/imagenet_permuted.py:pos=learned \
      --config.experiment_kwargs.config.data.data_dir=/path/to/tfds

Other presets as in configs/imagenet.py (debug, seed=N). Deviations: those of
configs/imagenet.py; the 128-dim learned encoding concatenated to RGB is
inferred (P1 does not state how it is combined).
"""

from typing import Optional

from configs import common
from configs import imagenet
import ml_collections

PERMUTATION_SEED = 20210304


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  options = common.parse_arg(arg, pos='fourier', debug=False, seed=0)
  if options.pos not in ('fourier', 'learned'):
    raise ValueError(
        f"pos must be 'fourier' or 'learned', got {options.pos!r}.")
  return imagenet.build_config(
      options, name=f'imagenet_permuted_{options.pos}',
      permutation_seed=PERMUTATION_SEED,
      position_encoding_type=options.pos)
