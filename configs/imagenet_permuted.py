r"""Permuted ImageNet: P1 Tab. 2, the Perceiver and baseline rows.

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

  baseline=resnet50|resnet50_ff|vit_b16|vit_b16_ff|transformer_64_ff
               configs/imagenet.py's baselines on the permuted pixels (the
               permutation after their Fourier features; the ResNet and ViT
               reshape the permuted array back to the 224x224 grid, which a
               permutation scrambles). P1 Tab. 2: ResNet-50 (FF) 39.4
               (73.5 unpermuted), ViT-B-16 (FF) 61.7 (76.7), Transformer
               64x64 (FF) 57.0 (57.0: a set model; the permutation of its
               4,096 inputs is drawn for M = 4,096). resnet50 and vit_b16
               without Fourier features are not in P1 Tab. 2 (no paper
               number).

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
  options = common.parse_arg(arg, pos='fourier', baseline='', debug=False,
                             seed=0)
  if options.pos not in ('fourier', 'learned'):
    raise ValueError(
        f"pos must be 'fourier' or 'learned', got {options.pos!r}.")
  imagenet.check_baseline(options, arg, others=())
  return imagenet.build_config(
      options,
      name=f'imagenet_permuted_{options.baseline or options.pos}',
      permutation_seed=PERMUTATION_SEED,
      position_encoding_type=options.pos)
