"""jaxline experiment: multi-label classification (AudioSet), scored by mAP.

As ClassificationExperiment, but with sigmoid cross-entropy on multi-hot
batch['labels'] [B, K], and an evaluation that averages the sigmoid scores of
the W windows of each clip (inputs shaped [B, W, ...]; P1: 16 overlapping
1.28 s windows) and reports mAP, mean AUC and d' over the whole eval set.
"""

from typing import Any, Mapping

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from experiments import classification
from perceiver_jax.training import logs
from perceiver_jax.training import losses
from perceiver_jax.training import multilabel_metrics

_AXIS = classification._AXIS  # pylint: disable=protected-access
_LOG = logs.get_logger(__name__)


class MultiLabelExperiment(classification.ClassificationExperiment):
  """Sigmoid cross-entropy training; mAP / AUC / d' evaluation."""

  def loss(self, logits: jax.Array, batch: Mapping[str, Any]) -> jax.Array:
    return losses.sigmoid_cross_entropy(logits, batch['labels'])

  def _train_metrics(self, logits, batch, mask, count):
    del logits, batch, mask, count
    return {}

  def _eval_fn(self, params: hk.Params, batch: Mapping[str, Any]):
    """Window-averaged scores of every example on every device."""
    inputs = batch['inputs']
    batch_size, num_windows = jax.tree.leaves(inputs)[0].shape[:2]
    flat = jax.tree.map(
        lambda x: x.reshape((batch_size * num_windows,) + x.shape[2:]),
        inputs)  # [B * W, ...]
    logits = self.forward.apply(params, None, flat, is_training=False)
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    scores = scores.reshape(batch_size, num_windows, -1).mean(axis=1)
    outputs = {'scores': scores, 'labels': batch['labels'],
               'mask': batch['mask']}
    # [all devices of all hosts, B, ...]: mAP needs every example at once.
    return jax.lax.all_gather(outputs, _AXIS)

  def evaluate(self, *, global_step: jax.Array, rng: jax.Array,
               writer: Any = None) -> dict[str, float]:
    del rng, writer
    if self._params is None:
      raise RuntimeError('No parameters to evaluate: restore a checkpoint.')
    scores, labels = [], []
    for batch in self._build_input(is_training=False):
      out = jax.device_get(jax.tree.map(lambda x: x[0], self._eval_pmap(
          self._params, batch)))
      keep = out['mask'].reshape(-1) > 0
      scores.append(out['scores'].reshape(keep.size, -1)[keep])
      labels.append(out['labels'].reshape(keep.size, -1)[keep])
    if not scores:
      raise ValueError(f'Eval split {self.config.data.eval_split!r} is empty.')
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    results = multilabel_metrics.multilabel_metrics(labels, scores)
    _LOG.info('eval at step %d over %d clips: %s',
              int(np.asarray(global_step)[0]), len(labels),
              {k: round(float(v), 4) for k, v in results.items()})
    return {'num_examples': float(len(labels)), **results}
