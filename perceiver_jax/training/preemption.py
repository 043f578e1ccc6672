"""Preemption: SIGTERM/SIGINT become a stop request that training polls.

`install_signal_handlers()` makes SIGTERM/SIGINT set a flag read by
`stop_requested()`; the experiment stops stepping when it is set and
jaxline's `train()` then saves the final checkpoint. A second signal acts as
it would without the handlers (kills the process).
"""

import signal
import threading
from typing import Any

from absl import logging


class PreemptionWatcher:
  """Turns SIGTERM/SIGINT into a flag that the training loop polls.

  The first signal sets the flag and puts back the handlers that were there
  before `install`, so a second signal acts as usual (terminates).
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._signals = tuple(signals)
    self._event = threading.Event()
    self._previous: dict[int, Any] = {}
    self._handler = self._handle  # One bound method, compared by identity.

  def install(self) -> None:
    """Installs the handlers; call from the main thread.

    Raises:
      RuntimeError: if called outside the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError('Signal handlers can only be installed from the '
                         'main thread.')
    for signum in self._signals:
      previous = signal.signal(signum, self._handler)
      if previous is not self._handler:
        # None: a handler not installed from Python; default is closest.
        self._previous[signum] = (signal.SIG_DFL if previous is None
                                  else previous)

  def uninstall(self) -> None:
    """Puts back the handlers found by `install` (the flag is kept)."""
    for signum, previous in self._previous.items():
      if signal.getsignal(signum) is self._handler:
        signal.signal(signum, previous)
    self._previous.clear()

  def stop_requested(self) -> bool:
    return self._event.is_set()

  def reset(self) -> None:
    self._event.clear()

  def request(self) -> None:
    """Sets the flag without a signal (another host received one)."""
    self._event.set()

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    logging.warning('Received %s: stopping after the current step and saving '
                    'a checkpoint. Send it again to exit at once.',
                    signal.Signals(signum).name)
    self._event.set()
    self.uninstall()


_WATCHER = PreemptionWatcher()


def install_signal_handlers() -> None:
  """Installs the process-wide PreemptionWatcher (main thread only)."""
  _WATCHER.install()


def uninstall_signal_handlers() -> None:
  _WATCHER.uninstall()


def stop_requested() -> bool:
  """True once SIGTERM/SIGINT arrived after install_signal_handlers()."""
  return _WATCHER.stop_requested()


def request_stop() -> None:
  """Marks this process as stopped for preemption: on a multi-host run, the
  hosts that got no signal stop at the same step and exit as preempted
  (143) too, so a launcher restarts them all."""
  _WATCHER.request()


def reset_stop_request() -> None:
  _WATCHER.reset()
