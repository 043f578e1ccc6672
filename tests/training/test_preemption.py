"""Preemption: SIGTERM becomes a stop request instead of killing training."""

import os
import signal

from perceiver_jax.training import preemption


def test_sigterm_sets_the_stop_flag_and_the_process_survives():
  watcher = preemption.PreemptionWatcher()
  before = signal.getsignal(signal.SIGTERM)
  watcher.install()
  try:
    assert not watcher.stop_requested()
    os.kill(os.getpid(), signal.SIGTERM)
    assert watcher.stop_requested()
    # A second signal would act as before install (here: pytest's handler).
    assert signal.getsignal(signal.SIGTERM) == before
  finally:
    watcher.uninstall()
    signal.signal(signal.SIGTERM, before)
  assert not preemption.stop_requested()  # The global one is separate.
