"""The benchmark's measurements on a tiny config (values, not speed)."""

import json
import time

import pytest

from configs import digits
from configs import imagenet
from perceiver_jax.modules import perceiver
from perceiver_jax.perf import benchmarking
from perceiver_jax.perf import hf_reference
from perceiver_jax.perf import host_memory
from perceiver_jax.training import precision
from tests import helpers
from tests import test_configs


@pytest.mark.parametrize('mode', ['forward', 'train'])
def test_benchmark_reports_positive_measurements(mode):
  config = digits.get_config('debug').experiment_kwargs.config
  result = benchmarking.benchmark(
      config, mode=mode, batch_size=4, steps=2,
      peak={'peak_flops': 1e12, 'peak_matmul': 'given'})
  assert result['min_s'] <= result['median_s'] <= result['max_s']
  assert result['flops_per_step'] > 0
  assert result['mfu'] == pytest.approx(
      result['flops_per_step'] / result['median_s'] / 1e12)
  assert result['process_peak_rss_bytes'] > 0
  assert result['page_faults_per_step'] >= 0


@pytest.mark.parametrize('mode', ['forward', 'train'])
def test_compiled_step_counts_cpu_kernel_calls(mode):
  helpers.require_cpu_backend()
  config = digits.get_config('debug').experiment_kwargs.config
  _, info = benchmarking.compile_step(config, mode, 4)
  # 'auto' on CPU: attention is fused; dense layers' weight gradients go
  # through the matmul kernel.
  assert info['cpu_attention_calls'] > 0
  assert (info['cpu_matmul_calls'] > 0) == (mode == 'train')
  config.model.backend = 'reference'
  _, info = benchmarking.compile_step(config, mode, 4)
  assert info['cpu_attention_calls'] == info['cpu_matmul_calls'] == 0


def test_train_step_counts_backward_flops():
  config = digits.get_config('debug').experiment_kwargs.config
  flops = {mode: benchmarking.benchmark(
      config, mode=mode, batch_size=4, steps=1)['flops_per_step']
           for mode in ('forward', 'train')}
  assert 2 * flops['forward'] < flops['train'] < 4 * flops['forward']


def test_growth_recovers_linear_slopes():
  records = [{'num_inputs': m, 'median_s': 0.5 + 1e-6 * m,
              'process_peak_rss_bytes': 1e8 + 300 * m} for m in (1024, 4096,
                                                                 16384)]
  slopes = benchmarking.growth(records)
  assert slopes['median_s_per_input'] == pytest.approx(1e-6)
  assert slopes['process_peak_rss_bytes_per_input'] == pytest.approx(300)
  assert 'xla_temp_bytes_per_input' not in slopes


def test_compare_alternates_and_reports_ratios():
  calls = []

  def fake(name, seconds):
    def run():
      calls.append(name)
      time.sleep(seconds)
      return 0
    return run

  result = benchmarking.compare(
      {'ours': (fake('ours', 0.01), {'flops_per_step': 1e9}),
       'hf': (fake('hf', 0.02), {})},
      mode='train', batch_size=4, steps=3,
      peak={'peak_flops': 1e12, 'peak_matmul': 'given'})
  # 2 warm-up + 3 timed rounds, every other one in reverse order.
  assert calls == ['ours', 'hf', 'hf', 'ours'] * 2 + ['ours', 'hf']
  assert result['ours']['num_timed_steps'] == result['hf']['num_timed_steps'] == 3
  assert result['ours_over_hf'] == pytest.approx(
      result['ours']['median_s'] / result['hf']['median_s'])
  assert 0.2 < result['ours_over_hf'] < 0.9
  low, high = result['ours_over_hf_paired_iqr']
  assert 0.2 < low <= result['ours_over_hf_paired'] <= high < 0.9
  assert result['ours']['mfu'] == pytest.approx(
      1e9 / result['ours']['median_s'] / 1e12)
  assert 'mfu' not in result['hf']  # No FLOP count given.


def test_hf_reference_reads_benchmark_sizes():
  config = imagenet.get_config('bench_a').experiment_kwargs.config
  sizes = hf_reference._image_sizes(config)  # pylint: disable=protected-access
  assert sizes['input_channels'] == 133  # 3 + 2 x (2 x 32 + 1).
  assert sizes['cross_qk_channels'] == 133  # P1: the input's width.
  assert (sizes['num_latents'], sizes['latent_dim']) == (128, 256)
  assert sizes['max_resolution'] == (64, 64)


@pytest.mark.parametrize('preset, problem', [
    ('', '1 cross-attend'), ('one_cross,p2', 'a classification decoder')])
def test_hf_reference_refuses_what_hf_cannot_express(preset, problem):
  config = imagenet.get_config(preset).experiment_kwargs.config
  with pytest.raises(ValueError, match=problem):
    hf_reference._image_sizes(config)  # pylint: disable=protected-access


def test_mfu_uses_the_best_peak_of_before_and_after():
  peak = benchmarking.best_peak({'peak_flops': 1e11, 'peak_matmul': 'm'},
                                {'peak_flops': 2e11, 'peak_matmul': 'm'})
  assert peak['peak_flops'] == 2e11
  assert peak['peak_flops_measured'] == [1e11, 2e11]
  result = {'achieved_flops': 5e10,
            'ours': {'achieved_flops': 1e11}, 'hf': {'median_s': 1.0}}
  benchmarking.add_mfu(result, peak)
  assert result['mfu'] == 0.25 and result['ours']['mfu'] == 0.5
  assert 'mfu' not in result['hf']


def test_parse_variant_splits_config_keys_from_xla_options():
  overrides, options = benchmarking.parse_variant(
      ' model.encoder.cross_attention=direct  xla_cpu_prefer_vector_width=512'
      ' xla_cpu_enable_fast_min_max=true xla_cpu_experimental_ynn_fusion_type='
      ' xla_made_up=1.5 ')
  assert overrides == {'model.encoder.cross_attention': 'direct'}
  assert options == {'xla_cpu_prefer_vector_width': 512,
                     'xla_cpu_enable_fast_min_max': True,
                     'xla_cpu_experimental_ynn_fusion_type': '',
                     'xla_made_up': 1.5}


@pytest.mark.parametrize('spec, message', [
    ('  ', 'empty variant'),
    ('model.encoder.cross_attention', 'is not key=value'),
    ('=3', 'is not key=value'),
    ('training.seed=1 training.seed=2', 'given twice'),
])
def test_parse_variant_rejects(spec, message):
  with pytest.raises(ValueError, match=message):
    benchmarking.parse_variant(spec)


def test_with_overrides_converts_to_the_replaced_type_on_a_copy():
  config = imagenet.get_config('bench_a').experiment_kwargs.config
  new = benchmarking.with_overrides(config, {
      'model.encoder.cross_attention': 'direct',
      'model.encoder.cross_attention_chunk_size': '2048',  # Was None.
      'training.batch_size': '8',
      'data.input_shape': '(32, 32, 3)',
      'training.precision': 'bfloat16',
  })
  assert new.model.encoder.cross_attention == 'direct'
  assert new.model.encoder.cross_attention_chunk_size == 2048
  assert new.training.batch_size == 8
  assert new.data.input_shape == (32, 32, 3)
  assert config.model.encoder.cross_attention == 'auto'  # Untouched.
  assert config.model.encoder.cross_attention_chunk_size is None
  chunked = imagenet.get_config('bench_b').experiment_kwargs.config
  assert benchmarking.with_overrides(chunked, {
      'model.encoder.cross_attention_chunk_size': 'none'
  }).model.encoder.cross_attention_chunk_size is None


@pytest.mark.parametrize('key, value, message', [
    ('model.encoder.cross_atention', 'direct',
     r"model.encoder has no 'cross_atention'; did you mean \['cross_attention'"),
    ('modl.encoder.x', '1', "the experiment config has no 'modl'"),
    ('training.batch_size.x', '1', 'is a value, not a section'),
    ('model.encoder', 'direct', 'is a config section, not a value'),
    ('training.batch_size', 'big', r"expected int \(it is 16\)"),
    ('data.input_shape', '[32, 32, 3]', 'expected tuple'),
])
def test_with_overrides_rejects(key, value, message):
  config = imagenet.get_config('bench_a').experiment_kwargs.config
  with pytest.raises(ValueError, match=message):
    benchmarking.with_overrides(config, {key: value})


def test_compile_step_passes_compiler_options():
  config = digits.get_config('debug').experiment_kwargs.config
  with pytest.raises(Exception, match='xla_no_such_option'):
    benchmarking.compile_step(config, 'forward', 2,
                              compiler_options={'xla_no_such_option': 1})


def test_benchmark_script_against_variants():
  out = helpers.run_benchmark_script(
      '--mode=forward', '--batch=4', '--steps=3',
      '--against=model.encoder.cross_attention=direct',
      '--against=xla_cpu_enable_fast_min_max=true')
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  direct = 'model.encoder.cross_attention=direct'
  flag = 'xla_cpu_enable_fast_min_max=true'
  for name in ('baseline', direct, flag):
    assert result[name]['num_timed_steps'] == 3
    assert 0 < result[name]['mfu'] < 1
  assert result[direct]['overrides'] == {
      'model.encoder.cross_attention': 'direct'}
  assert result[flag]['compiler_options'] == {
      'xla_cpu_enable_fast_min_max': True}
  # The direct formulation projects the whole input: more FLOPs.
  assert result[direct]['flops_per_step'] > result['baseline'][
      'flops_per_step'] == result[flag]['flops_per_step']
  for name in (direct, flag):
    assert result[f'baseline_over_{name}_paired'] > 0

  bad = helpers.run_benchmark_script(
      '--against=model.encoder.cross_atention=direct')
  assert bad.returncode != 0
  assert "did you mean ['cross_attention'" in bad.stderr


_GLIBC = host_memory.glibc_version() or (0, 0)


@pytest.mark.skipif(_GLIBC < (2, 26) or host_memory.has_accelerator(),
                    reason='keeps freed memory on glibc CPU-only hosts')
def test_benchmark_script_keeps_freed_memory_by_default():
  out = helpers.run_benchmark_script('--mode=forward', '--batch=4',
                                     '--steps=3', malloc=None)
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['keep_freed_memory'] is True
  # Each step's buffers come from memory the process already holds.
  assert result['page_faults_per_step'] < 50


def test_benchmark_script_sweep_measures_rss_without_kept_memory():
  out = helpers.run_benchmark_script('--mode=forward', '--batch=2',
                                     '--steps=2', '--sweep-inputs=8,16',
                                     malloc=None)
  assert out.returncode == 0, out.stderr[-2000:]
  *points, growth = [json.loads(line) for line in out.stdout.splitlines()]
  assert [p['num_inputs'] for p in points] == [64, 256]
  assert not any(p['keep_freed_memory'] for p in points)
  assert growth['sweep_growth']['xla_temp_bytes_per_input'] > 0


def test_steps_follow_the_configs_precision():
  """training.precision reaches the benchmarked step (bf16 compute), and
  'auto' is float32 on this CPU host."""
  exp = test_configs._load(  # pylint: disable=protected-access
      'imagenet.py', 'debug').experiment_kwargs.config
  texts = {}
  for name in ('bfloat16', 'auto'):
    exp.training.precision = name
    step, args = benchmarking.make_step(exp, 'forward', 2)
    texts[name] = step.lower(*args).as_text()
  precision.apply_policy('float32', [perceiver.Perceiver])
  assert 'bf16' in texts['bfloat16'] and 'bf16' not in texts['auto']
