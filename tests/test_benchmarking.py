"""The benchmark's measurements on a tiny config (values, not speed)."""

import pytest

from configs import digits
from perceiver_jax import benchmarking


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
