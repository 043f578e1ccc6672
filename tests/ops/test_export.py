"""Programs lowered for one platform hold that platform's ops only.

Training gradients are exported with `jax.export` for 'cpu', 'cuda' and
'tpu' on this (CPU) host: small P1 and P2 ImageNet models for every
platform (the CPU backend's kernels appear in the CPU program and in no
other; the TPU program holds the Pallas flash attention kernel), and the
paper-size P1 model in bfloat16 for the accelerators.
"""

import jax
from jax import export
import jax.numpy as jnp
import pytest

from perceiver_jax import models
from perceiver_jax import ops
from perceiver_jax.analysis import summary
from perceiver_jax.modules import perceiver
from perceiver_jax.training import precision
from tests import helpers
from tests import test_configs

_CPU_KERNEL = 'perceiver_jax_cpu'


def _training_gradient(experiment_config, backend='auto'):
  """(grad of the cross-entropy loss, abstract params, abstract batch)."""
  model = experiment_config.model.copy_and_resolve_references()
  model.backend = backend
  forward = models.make_forward(model)
  images = summary.input_spec(experiment_config.data, batch_size=1)
  labels = jax.ShapeDtypeStruct((1,), jnp.int32)
  params = jax.eval_shape(
      lambda x: forward.init(jax.random.key(0), x, is_training=True), images)

  def loss(params, images, labels):
    logits = forward.apply(params, jax.random.key(1), images,
                           is_training=True)
    return -jnp.mean(jnp.take_along_axis(
        jax.nn.log_softmax(logits), labels[:, None], axis=-1))

  return jax.jit(jax.grad(loss)), (params, images, labels)


def _exported_text(fn, args, platform):
  # The CPU kernels are this project's own FFI targets, with no stability
  # guarantee across jaxlib versions: the CPU export must allow them.
  checks = [export.DisabledSafetyCheck.custom_call(target)
            for target in ops.flop_rules()]
  return export.export(fn, platforms=(platform,), disabled_checks=checks)(
      *args).mlir_module()


@pytest.mark.parametrize('preset', ['debug', 'p2,debug'])
def test_accelerator_programs_hold_no_cpu_kernel(preset):
  helpers.require_cpu_backend()
  config = test_configs._load(  # pylint: disable=protected-access
      'imagenet.py', preset).experiment_kwargs.config
  grad, args = _training_gradient(config)
  texts = {platform: _exported_text(grad, args, platform)
           for platform in ('cpu', 'cuda', 'tpu')}
  assert _CPU_KERNEL in texts['cpu']
  assert _CPU_KERNEL not in texts['cuda']
  assert _CPU_KERNEL not in texts['tpu']
  assert 'tpu_custom_call' in texts['tpu']
  # The reference backend holds no kernel on any platform.
  grad, args = _training_gradient(config, backend='reference')
  assert _CPU_KERNEL not in _exported_text(grad, args, 'cpu')


@pytest.fixture
def bfloat16_policy():
  """The bfloat16 mixed-precision policy on the Perceiver, for one test."""
  precision.apply_policy('bfloat16', [perceiver.Perceiver])
  yield
  precision.apply_policy('float32', [perceiver.Perceiver])


@pytest.mark.slow
def test_p1_imagenet_accelerator_programs_in_bfloat16(bfloat16_policy):
  """The paper-size P1 gradient: Pallas on TPU, no CPU kernel anywhere."""
  del bfloat16_policy
  config = test_configs._load(  # pylint: disable=protected-access
      'imagenet.py', None).experiment_kwargs.config
  grad, args = _training_gradient(config)
  tpu = _exported_text(grad, args, 'tpu')
  assert 'tpu_custom_call' in tpu and 'bf16' in tpu
  assert _CPU_KERNEL not in tpu
  assert _CPU_KERNEL not in _exported_text(grad, args, 'cuda')
