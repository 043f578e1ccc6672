"""Top-k ImageNet classes of image files under a checkpoint's model.

`classify` is scripts/classify.py's work: each file is preprocessed exactly
as the config's ImageNet evaluation (`imagenet.load_eval_image`), the
checkpoint's parameters and model state (`checkpointing.restore_checkpoint`,
the snapshot's 'params' and, for models with BatchNorm, 'state') go through
`models.make_forward_with_state(config.model)` in float32 on the default JAX
device, and `imagenet_labels.top_k` names the classes.
"""

from typing import Any, Sequence

import haiku as hk
import jax
import ml_collections
import numpy as np

from perceiver_jax import models
from perceiver_jax.data import imagenet
from perceiver_jax.data import imagenet_labels
from perceiver_jax.training import checkpointing

# Messages list at most this many parameter names per kind of problem.
_MAX_LISTED = 10


class CheckpointMismatch(ValueError):
  """The checkpoint's parameters are not those of the config's model."""


def classify(config: ml_collections.ConfigDict, checkpoint: str,
             image_paths: Sequence[str], *, k: int = 5
             ) -> list[dict[str, Any]]:
  """The top-k ImageNet classes of each image under a checkpoint's model.

  Args:
    config: the experiment config (as --config gives it); its data must be
      ImageNet's, with 1,000 classes.
    checkpoint: a checkpoint root, series or step directory.
    image_paths: image files.
    k: classes per image, 1..1000.

  Returns:
    One {'image': path, 'top_k': imagenet_labels.top_k(...)} per image, in
    order.

  Raises:
    ValueError: for a config that is not ImageNet's with 1,000 classes, no
      images, a bad k, an undecodable image, or a checkpoint whose model
      does not give 1,000 logits.
    FileNotFoundError: for a missing image or a checkpoint path without a
      complete step.
    CheckpointMismatch: for parameters that do not fit the config's model.
  """
  exp = config.experiment_kwargs.config
  num_classes = exp.data.get('num_classes')
  if exp.data.get('name') != 'imagenet' or num_classes != (
      imagenet_labels.NUM_CLASSES):
    raise ValueError(
        f'classify needs an ImageNet config with '
        f'{imagenet_labels.NUM_CLASSES} classes (its preprocessing and class '
        f'names); this config has data {exp.data.get("name")!r} with '
        f'{num_classes} classes.')
  if not image_paths:
    raise ValueError('No image files given.')
  if not 1 <= k <= imagenet_labels.NUM_CLASSES:
    raise ValueError(f'k={k} must be in [1, {imagenet_labels.NUM_CLASSES}].')
  images = [imagenet.load_eval_image(p, exp.data) for p in image_paths]
  restored = checkpointing.restore_checkpoint(checkpoint)
  snapshot = restored['experiment_module']
  params, state = snapshot['params'], snapshot.get('state') or {}
  transformed = models.make_forward_with_state(exp.model)
  _check_params(params, state, transformed, images[0], restored['path'])
  forward = jax.jit(lambda p, s, x: transformed.apply(
      p, s, None, x, is_training=False)[0])
  names = imagenet_labels.class_names()
  ids = imagenet_labels.synsets()
  results = []
  for path, image in zip(image_paths, images):
    logits = np.asarray(forward(params, state, image[None]))[0]  # [K]
    if logits.shape != (imagenet_labels.NUM_CLASSES,):
      raise ValueError(
          f'The model of {checkpoint} gives {logits.shape[-1]} logits; '
          f'expected {imagenet_labels.NUM_CLASSES}.')
    results.append({'image': path,
                    'top_k': imagenet_labels.top_k(logits, k, names, ids)})
  return results


def restore_params(model: ml_collections.ConfigDict, checkpoint: str,
                   example: np.ndarray) -> tuple[hk.Params, hk.State]:
  """A checkpoint's (params, state) for `model`, checked against it.

  Args:
    model: the model section of the config.
    checkpoint: a checkpoint root, series or step directory.
    example: one input, no batch axis (its shape builds the model).

  Returns:
    (params, state); state is {} for models without BatchNorm.

  Raises:
    FileNotFoundError: a path without a complete step.
    CheckpointMismatch: parameters that do not fit the model.
  """
  restored = checkpointing.restore_checkpoint(checkpoint)
  snapshot = restored['experiment_module']
  params, state = snapshot['params'], snapshot.get('state') or {}
  _check_params(params, state, models.make_forward_with_state(model),
                example, restored['path'])
  return params, state


def _check_params(params: Any, state: Any,
                  transformed: hk.TransformedWithState, image: np.ndarray,
                  path: Any) -> None:
  """CheckpointMismatch naming the missing, extra and mis-shaped arrays."""
  # Initialised as in training: BatchNorm creates its averages only then.
  want_params, want_state = jax.eval_shape(
      lambda x: transformed.init(jax.random.key(0), x, is_training=True),
      image[None])

  def flat(prefix, tree):
    return {prefix + jax.tree_util.keystr(k): tuple(np.shape(v))
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}

  want = {**flat('params', want_params), **flat('state', want_state)}
  got = {**flat('params', params), **flat('state', state)}
  problems = {
      'missing': sorted(set(want) - set(got)),
      'unexpected': sorted(set(got) - set(want)),
      'mis-shaped': [f'{k}: {got[k]} (model: {want[k]})'
                     for k in sorted(set(want) & set(got))
                     if want[k] != got[k]],
  }
  lines = [f'{len(names)} {kind}: {names[:_MAX_LISTED]}'
           for kind, names in problems.items() if names]
  if lines:
    raise CheckpointMismatch(
        f'The arrays in {path} do not fit the config\'s model (a checkpoint '
        'of another config?): ' + '; '.join(lines))
