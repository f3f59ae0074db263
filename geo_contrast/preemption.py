"""SIGTERM handling for preemptible machines: finish the step, checkpoint, exit 0.

A preempted Cloud TPU / spot VM gets SIGTERM and some seconds of grace. The first SIGTERM (or SIGINT) only
sets a flag that the loop reads at the next step boundary, so the checkpoint is of a whole step; a second one
means "now" and exits at once with the signal's conventional status.
"""

import signal
import sys


class StopRequest:

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.requested = None  # The name of the first signal received.
    self._previous = {s: signal.signal(s, self._handle) for s in signals}

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.requested:
      sys.stderr.write(f"\nSecond {name}: exiting now without a checkpoint.\n")
      sys.stderr.flush()
      raise SystemExit(128 + signum)
    self.requested = name
    sys.stderr.write(f"\n{name} received: saving a checkpoint at the next step boundary, then exiting.\n")
    sys.stderr.flush()

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
