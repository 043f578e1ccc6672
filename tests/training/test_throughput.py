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
