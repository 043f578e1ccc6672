"""perceiver_jax.perf.profiling: HLO parsing, grouping and a traced step."""

import json

import jax
import jax.numpy as jnp
import pytest

from configs import digits
from perceiver_jax.analysis import flops as flops_lib
from perceiver_jax.perf import benchmarking
from perceiver_jax.perf import profiling
from tests import helpers


@pytest.mark.parametrize('op_name, expected', [
    ('jit(train_step)/transpose(jvp(perceiver))/encoder/latent_transformer/'
     'latent_block_5/mlp/output/dot_general',
     ('perceiver/encoder/latent_transformer/latent_block_*/mlp/output',
      'backward')),
    ('jit(train_step)/jvp(perceiver)/encoder/cross_attend_0/attention/'
     'while/body/closed_call/checkpoint/dot_general',
     ('perceiver/encoder/cross_attend_*/attention', 'forward')),
    ('jit(<lambda>)/perceiver/decoder/logits/dot_general',
     ('perceiver/decoder/logits', 'forward')),
    ('jit(train_step)/transpose(jvp(perceiver))/encoder/attention/transpose;'
     'jit(train_step)/perceiver/encoder/other/mul',
     ('perceiver/encoder/attention', 'backward')),
    ('add', ('', 'other')),
    ('jit(train_step)/jit(norm)/reduce_sum', ('', 'other')),
    ('', ('', 'other')),
])
def test_module_and_pass(op_name, expected):
  assert profiling.module_and_pass(op_name) == expected


def test_split_overlaps_shares_concurrent_time():
  # a: 0-10 alone then with b; b: 5-15; c: 20-22 alone (on another thread).
  shares = profiling._split_overlaps(
      {'a': [(0.0, 10.0)], 'b': [(5.0, 10.0)], 'c': [(20.0, 2.0)]})
  assert shares['a'] == [(0.0, pytest.approx(7.5))]
  assert shares['b'] == [(5.0, pytest.approx(7.5))]
  assert shares['c'] == [(20.0, pytest.approx(2.0))]


def test_parse_hlo_rejects_text_without_hlo():
  with pytest.raises(ValueError, match='No HLO computation'):
    profiling.parse_hlo('this is not HLO\n')


def _compiled_run(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  return (lambda: compiled(*args)), compiled.as_text()


def test_grad_step_groups_layers_and_passes_and_counts_all_flops():
  def loss(ws, x):
    for i, w in enumerate(ws):
      with jax.named_scope(f'layer_{i}'), jax.named_scope('dense'):
        x = jnp.tanh(x @ w)
    return jnp.sum(x)

  ws = [jnp.full((96, 96), 0.01), jnp.full((96, 96), 0.02)]
  x = jnp.ones((64, 96))
  step = jax.grad(loss)
  run, text = _compiled_run(step, ws, x)
  result = profiling.profile_step(run, text, steps=2)

  expected = flops_lib.count_flops(jax.jit(step), ws, x)
  assert result['matmul_gflop_per_step'] * 1e9 == pytest.approx(expected)
  by_key = {(g['module'], g['pass']): g for g in result['groups']}
  assert ('layer_*/dense', 'forward') in by_key  # Both layers in one group.
  assert ('layer_*/dense', 'backward') in by_key
  assert sum(g['gflop_per_step'] for g in result['groups']) == pytest.approx(
      result['matmul_gflop_per_step'])
  assert sum(g['share'] for g in result['groups']) == pytest.approx(1.0)
  for g in result['groups']:
    assert 0 <= g['min_ms'] <= g['ms_per_step'] <= g['max_ms']
    assert g['ms_per_step'] <= g['op_ms_per_step'] + 1e-9
    assert g['num_ops'] >= 1
    assert (g['gflops_per_s'] is None) == (g['gflop_per_step'] == 0)
  # Overlaps are split, not double-counted: the ops' wall time fits in the
  # step (medians over steps, hence the margin).
  assert 0 < result['busy_ms_per_step'] <= 1.1 * result['traced_step_s'] * 1e3


def test_loop_body_flops_count_once_per_iteration():
  n, iterations = 64, 5

  def repeated(x, w):
    def body(carry, _):
      with jax.named_scope('step'):
        return jnp.tanh(carry @ w), None
    return jax.lax.scan(body, x, None, length=iterations)[0]

  run, text = _compiled_run(repeated, jnp.ones((n, n)), jnp.eye(n))
  result = profiling.profile_step(run, text, steps=3)
  assert result['matmul_gflop_per_step'] * 1e9 == 2 * n**3 * iterations
  (group,) = [g for g in result['groups'] if g['gflop_per_step']]
  assert group['module'] == 'step' and group['num_ops'] >= 1


def test_benchmark_profile_of_a_train_step():
  config = digits.get_config('debug').experiment_kwargs.config
  result = benchmarking.profile(config, mode='train', batch_size=4, steps=2)
  assert result['matmul_gflop_per_step'] * 1e9 == pytest.approx(
      result['flops_per_step'], rel=1e-3)
  passes = {g['pass'] for g in result['groups']}
  assert passes == {'forward', 'backward', 'other'}  # other: the optimizer.
  assert any(g['module'].startswith('perceiver/encoder')
             for g in result['groups'])
  table = profiling.format_table(result, top=3)
  assert table.count('\n') == 5  # Header, 3 rows, 'more', totals.
  assert 'traced step' in table


def test_benchmark_script_profile_flag():
  out = helpers.run_benchmark_script('--mode=forward', '--batch=4',
                                     '--profile=1')
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['traced_steps'] == 1 and result['mode'] == 'forward'
  passes = {g['pass'] for g in result['groups']}
  assert 'forward' in passes and 'backward' not in passes
  assert 'GFLOP/s' in out.stderr and 'traced step' in out.stderr

  bad = helpers.run_benchmark_script('--profile=0')
  assert bad.returncode != 0
  assert '--profile takes a number of steps >= 1' in bad.stderr
