"""The benchmark's measurements on a tiny config (values, not speed)."""

import time

import pytest

from configs import digits
from configs import imagenet
from perceiver_jax import benchmarking
from perceiver_jax import hf_reference


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
  assert calls == ['ours', 'hf'] * 5  # 2 warm-up + 3 timed turns.
  assert result['ours']['num_timed_steps'] == result['hf']['num_timed_steps'] == 3
  assert result['ours_over_hf'] == pytest.approx(
      result['ours']['median_s'] / result['hf']['median_s'])
  assert 0.2 < result['ours_over_hf'] < 0.9
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
