"""Per-device model FLOP/s and MFU against the table of peaks."""

import dataclasses

import pytest

from perceiver_jax.training import throughput


@dataclasses.dataclass
class _Device:
  device_kind: str


@pytest.mark.parametrize('kind, peak', [
    ('TPU v3', 61.5e12), ('TPU v4', 275e12), ('TPU v5 lite', 197e12),
    ('TPU v5p', 459e12), ('TPU v6 lite', 918e12),
    ('NVIDIA A100-SXM4-80GB', 312e12), ('NVIDIA H100 80GB HBM3', 989e12),
    ('NVIDIA H100 PCIe', 756e12),
    ('NVIDIA H200', 989e12)])
def test_peaks_of_listed_devices(kind, peak):
  assert throughput.peak_flops(_Device(kind)) == peak


def test_mfu_is_model_flops_over_the_peak():
  metrics = throughput.step_metrics(1e12, 98.9, _Device('NVIDIA H100 HBM3'))
  assert metrics['tflops_per_device'] == pytest.approx(98.9)
  assert metrics['mfu'] == pytest.approx(0.1)
  # Devices without a listed peak (CPUs) get FLOP/s, no MFU.
  assert throughput.step_metrics(1e9, 2.0, _Device('cpu')) == {
      'tflops_per_device': pytest.approx(2e-3)}


def test_step_rate_is_jaxline_steps_per_sec_over_the_same_interval():
  """The ETA's rate (a moving average over the progress interval) is the
  steps_per_sec jaxline logs at that step, not the last step's rate."""
  from jaxline import utils  # pylint: disable=g-import-not-at-top
  logged = {}
  action = utils.PeriodicAction(
      lambda step, scalars: logged.update({step: scalars['steps_per_sec']}),
      interval_type='steps', interval=4, run_async=False)
  action.update_time(100.0, 0)
  rate = throughput.StepRate(window=4)
  rate.update(0, 100.0)
  t, ours = 100.0, {}
  for step in range(1, 13):
    t += 0.5 if step % 4 else 3.0  # A slow step (a save) every 4.
    action(t, step, {})
    ours[step] = rate.update(step, t)
  assert sorted(logged) == [4, 8, 12]
  for step, jaxline_rate in logged.items():
    assert ours[step] == pytest.approx(jaxline_rate)
    assert jaxline_rate == pytest.approx(4 / 4.5)
  assert ours[5] == pytest.approx(4 / 4.5)  # Slides: steps 1..5.
  with pytest.raises(ValueError, match='window must be >= 1'):
    throughput.StepRate(window=0)
