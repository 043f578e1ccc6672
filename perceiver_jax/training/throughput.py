"""Model FLOP/s per device and MFU, as large JAX trainers log them.

MFU (model FLOPs utilisation) = the model's matmul FLOPs per second on a
device (2 per multiply-add, counted from the traced step:
`perceiver_jax.analysis.flops`) over the device's peak dense bfloat16
throughput. The peaks below are the vendors' published figures per JAX
device (a TPU v3 chip is two devices; v4 and later, one).

`StepRate` is the training rate the progress line and its ETA use: steps
per second over a sliding window of recent steps, the same average jaxline
logs as steps_per_sec when its log interval equals the window.
"""

import collections
from typing import Optional

import jax

# (substring of jax.Device.device_kind, peak dense bf16 FLOP/s per device).
# The first match wins, so more specific names come first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ('TPU v6 lite', 918e12),  # v6e (Trillium)
    ('TPU v6e', 918e12),
    ('TPU v5 lite', 197e12),  # v5e
    ('TPU v5e', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),
    ('TPU v4', 275e12),
    ('TPU v3', 61.5e12),  # 123e12 per chip, two cores
    ('H200', 989e12),
    ('H100 PCIe', 756e12),
    ('H100', 989e12),  # SXM
    ('A100', 312e12),
)


def peak_flops(device: jax.Device) -> Optional[float]:
  """Peak dense bf16 FLOP/s of `device`, or None for kinds not listed."""
  for kind, peak in PEAK_FLOPS:
    if kind in device.device_kind:
      return peak
  return None


def step_metrics(flops_per_device_step: float, steps_per_sec: float,
                 device: jax.Device) -> dict[str, float]:
  """{'tflops_per_device': ..., 'mfu': ...} (mfu only for listed devices).

  Args:
    flops_per_device_step: matmul FLOPs one device runs per training step.
    steps_per_sec: training steps per second.
    device: the device, for its peak.
  """
  flops_per_sec = flops_per_device_step * steps_per_sec
  metrics = {'tflops_per_device': flops_per_sec / 1e12}
  peak = peak_flops(device)
  if peak is not None:
    metrics['mfu'] = flops_per_sec / peak
  return metrics


class StepRate:
  """Steps per second over the last `window` steps (a moving average).

  jaxline's steps_per_sec is (steps since its last log) / (seconds since
  it); with `window` equal to that log interval, the rate at a logged step
  is the same number. A one-step rate would swing with every slow step
  (a checkpoint save, an input stall) and make the ETA jump.
  """

  def __init__(self, window: int):
    """Args: window: steps to average over, >= 1.

    Raises:
      ValueError: if window < 1.
    """
    if window < 1:
      raise ValueError(f'StepRate window must be >= 1; got {window}.')
    # (time, step) of the last window + 1 steps: `window` intervals.
    self._marks = collections.deque(maxlen=window + 1)

  def update(self, step: int, t: float) -> Optional[float]:
    """Records that `step` steps were done at time `t` (seconds).

    Returns:
      Steps per second over the window so far; None until two steps are
      recorded (or if no time passed).
    """
    self._marks.append((t, step))
    (t0, s0), (t1, s1) = self._marks[0], self._marks[-1]
    if t1 - t0 <= 0 or s1 == s0:
      return None
    return (s1 - s0) / (t1 - t0)
