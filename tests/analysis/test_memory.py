"""Training memory: XLA's compiled plan and the estimate for other platforms."""

import json
import pathlib
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from perceiver_jax import ops
from perceiver_jax.analysis import memory
from perceiver_jax.modules import perceiver


def _digits(remat=False):
  config = digits.get_config('debug').experiment_kwargs.config
  with config.unlocked():
    config.model.encoder.remat = remat
  return config


def test_compiled_plan_counts_state_and_batch():
  config = _digits()
  result = memory.training_memory(config, 8)
  assert result.method == 'compiled' and result.platform == 'cpu'
  assert result.compute_dtype == 'float32'
  params = jax.eval_shape(
      lambda x: memory.make_train_step(config)[0].init(
          jax.random.key(0), x, is_training=True),
      memory.batch_spec(config.data, 8)[0])
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  assert result.parameters == 4 * num_params
  # LAMB keeps two moments per parameter (plus a step count).
  assert 2 * result.parameters <= result.optimizer_state < (
      2 * result.parameters + 1024)
  assert result.batch == 8 * (8 * 8 * 1 + 1) * 4  # 8x8x1 images + labels.
  assert result.total >= (result.parameters + result.optimizer_state +
                          result.temporaries)


def test_estimate_bounds_the_compiled_plan_and_extrapolates():
  config = _digits()
  compiled = memory.training_memory(config, 48).total
  estimate = memory.estimated_memory(config, 48, 'cpu')
  assert compiled <= estimate.total < 2 * compiled
  # estimate_fn traces batches 2 and 4 and extrapolates to the same numbers.
  at = memory.estimate_fn(config, 'cpu')
  assert at(48) == estimate
  assert at(96).activations > 1.9 * estimate.activations


def test_estimate_for_tpu_is_bfloat16_and_leaves_no_policy_behind():
  result = memory.training_memory(_digits(), 4, 'tpu')
  assert result.method == 'estimate' and result.compute_dtype == 'bfloat16'
  assert result.gradients == result.parameters
  # The bfloat16 policy set while estimating is cleared after.
  assert hk.mixed_precision.get_policy(perceiver.Perceiver) is None


def test_remat_keeps_only_block_inputs_for_the_backward_pass():
  plain = memory.estimated_memory(_digits(), 32, 'cpu')
  remat = memory.estimated_memory(_digits(remat=True), 32, 'cpu')
  assert remat.activations < plain.activations / 5
  # What one segment recomputes is counted instead.
  assert remat.working > plain.working
  assert remat.total < plain.total


def test_largest_batch_bisects():
  at = lambda b: memory.TrainingMemory(
      method='estimate', platform='tpu', batch_size=b, compute_dtype='bf16',
      total=100 + 7 * b, parameters=0, optimizer_state=0, batch=0)
  assert memory.largest_batch(at, 100 + 7 * 37) == 37
  assert memory.largest_batch(at, 100 + 7 * 37 + 6) == 37
  assert memory.largest_batch(at, 50) == 0


def test_bad_arguments():
  with pytest.raises(ValueError, match='batch_size'):
    memory.training_memory(_digits(), 0)
  with pytest.raises(ValueError, match='platform'):
    memory.training_memory(_digits(), 1, 'gpu')
  with pytest.raises(ValueError, match='platform'):
    with ops.tracing_for('rocm'):
      pass


def test_tracing_for_a_platform_traces_only_its_ops():
  q = jnp.ones((1, 4, 2, 8))

  def jaxpr_text():
    # A new function each time: make_jaxpr caches traces by function.
    return str(jax.make_jaxpr(lambda q: ops.attention(q, q, q))(q))

  with ops.tracing_for('tpu'):
    tpu = jaxpr_text()
  assert 'platform_index' not in tpu and 'pallas_call' in tpu
  with ops.use_backend('reference'), ops.tracing_for('tpu'):
    reference = jaxpr_text()
  assert 'pallas_call' not in reference and 'platform_index' not in reference
  assert 'platform_index' in jaxpr_text()


def test_model_summary_script_reports_memory_and_largest_batch():
  out = subprocess.run(
      [sys.executable, 'scripts/model_summary.py',
       '--config=configs/digits.py:debug', '--batch_size=8',
       '--platform=tpu', '--capacity_gib=0.05'],
      capture_output=True, text=True, check=True,
      cwd=pathlib.Path(__file__).parents[2])
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['training_memory']['method'] == 'estimate'
  assert result['training_memory']['batch_size'] == 8
  largest = result['largest_batch']['batch_size']
  assert largest > 8
  assert result['training_memory']['total'] < 0.05 * 2**30
