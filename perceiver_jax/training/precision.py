"""Mixed-precision policies (haiku + jmp), set once by the experiment.

Modules hold no dtype logic; `apply_policy(compute_dtype, MODEL_CLASSES)`
decides for all of them. MODEL_CLASSES are the top-level model classes
`models.build_model` returns: `perceiver.Perceiver` and P1's baselines
(`baselines.Baseline`, which holds the ResNet, ViT or Transformer and its
preprocessor), so every model trains under the same policy:

- 'auto': 'bfloat16' on GPU and TPU, 'float32' on CPU (`resolve`, from
  the platform of the devices the experiment trains on; XLA:CPU has no fast
  bfloat16 matrix products).
- 'float32': no policy; everything in float32.
- 'bfloat16': on each given model class, parameters are created and kept in
  float32 (so are the gradients and the optimizer state, which follow the
  parameters), inputs and parameters are cast to bfloat16 for compute, and
  the outputs (logits) come back in float32 for the loss. Normalisation
  layers (LayerNorm, BatchNorm: the ResNet's too) compute in float32 (mean
  and variance in bfloat16 lose too much) and hand bfloat16 back to the
  model.

Attention softmax must run in float32 too: a policy applies to whole module
classes, so it cannot reach inside the attention function;
perceiver_jax/modules/attention.py upcasts the logits itself before the
softmax (the ViT and Transformer baselines use the same attention).
Fourier position features should likewise be computed in float32
(or NumPy) and only then cast: their phases reach pi * mu / 2, far beyond
what bfloat16's 8-bit mantissa resolves.

Caveats of haiku's mechanism: policies are global to the process and local
to the thread that sets them (call `apply_policy` in every thread that
traces the model), keyed by class (a subclass needs its own entry), and the
norm-layer policy applies to every LayerNorm/BatchNorm, also outside the
given models; 'float32' clears it again.
"""

from typing import Sequence

import haiku as hk
import jmp

from perceiver_jax.modules import attention
from perceiver_jax.modules import baselines
from perceiver_jax.modules import perceiver

PRECISIONS = ('auto', 'float32', 'bfloat16')
# What the policies below are applied with: 'auto' resolved.
COMPUTE_DTYPES = ('float32', 'bfloat16')

# The top-level classes of every model models.build_model makes.
MODEL_CLASSES: tuple[type[hk.Module], ...] = (perceiver.Perceiver,
                                              baselines.Baseline)

# Statistics layers that must compute in float32 under a bfloat16 policy.
NORM_CLASSES: tuple[type[hk.Module], ...] = (
    hk.LayerNorm, attention.LayerNorm, hk.BatchNorm)

_MODEL_POLICY = 'params=float32,compute=bfloat16,output=float32'
_NORM_POLICY = 'params=float32,compute=float32,output=bfloat16'


def resolve(name: str, platform: str) -> str:
  """The compute dtype of precision `name` on `platform` ('cpu', 'gpu',
  'tpu', as `jax.Device.platform` names them).

  Raises:
    ValueError: for a name not in PRECISIONS.
  """
  if name not in PRECISIONS:
    raise ValueError(f'Unknown precision {name!r}; expected one of '
                     f'{PRECISIONS}.')
  if name != 'auto':
    return name
  return 'float32' if platform == 'cpu' else 'bfloat16'


def model_policy(compute_dtype: str) -> jmp.Policy:
  """The jmp policy of a top-level model for `compute_dtype`.

  Raises:
    ValueError: for a dtype not in COMPUTE_DTYPES.
  """
  _check_dtype(compute_dtype)
  if compute_dtype == 'float32':
    return jmp.get_policy('float32')
  return jmp.get_policy(_MODEL_POLICY)


def _check_dtype(compute_dtype: str) -> None:
  if compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f'Unknown compute dtype {compute_dtype!r}; expected one '
                     f'of {COMPUTE_DTYPES} (resolve \'auto\' first).')


def apply_policy(compute_dtype: str,
                 model_classes: Sequence[type[hk.Module]]) -> None:
  """Sets (bfloat16) or clears (float32) the policies described above.

  Call before the model is first traced (e.g. in the experiment's
  constructor), in the thread that traces it.

  Args:
    compute_dtype: 'float32' or 'bfloat16'.
    model_classes: top-level hk.Module classes whose instances (and all their
      submodules) follow the policy, e.g. MODEL_CLASSES.

  Raises:
    ValueError: for an unknown dtype, or a class that is not an hk.Module
      subclass, or no classes with 'bfloat16'.
  """
  _check_dtype(compute_dtype)
  model_classes = tuple(model_classes)
  for cls in model_classes:
    if not (isinstance(cls, type) and issubclass(cls, hk.Module)):
      raise ValueError(f'model_classes must be hk.Module subclasses, got '
                       f'{cls!r}.')
  if compute_dtype == 'float32':
    for cls in model_classes + NORM_CLASSES:
      hk.mixed_precision.clear_policy(cls)
    return
  if not model_classes:
    raise ValueError("compute_dtype 'bfloat16' needs at least one model "
                     'class to apply the policy to.')
  policy = model_policy(compute_dtype)
  for cls in model_classes:
    hk.mixed_precision.set_policy(cls, policy)
  norm_policy = jmp.get_policy(_NORM_POLICY)
  for cls in NORM_CLASSES:
    hk.mixed_precision.set_policy(cls, norm_policy)
