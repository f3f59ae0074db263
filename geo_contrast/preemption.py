"""SIGTERM handling for preemptible machines: finish the step, checkpoint, exit 0.

A preempted Cloud TPU / spot VM gets SIGTERM and some seconds of grace. The first SIGTERM (or SIGINT) only
sets a flag that the training loop reads between steps, so the checkpoint is of a whole step; it also puts the
operating system's default action back, so a second signal ends the process at once, even while Python is
blocked inside a long XLA call, without a checkpoint (the previous one stays the latest).

With several processes the flag is only this process's vote: the loop sums the votes over all processes inside
the training step (`pretrain`), so every process stops after the same step even when only some of them were
signalled.
"""

import signal
import sys


class StopRequest:
  """Catches the first SIGTERM/SIGINT from construction until `restore()`."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.requested = None  # The name of the first signal received.
    self._previous = {s: signal.signal(s, self._handle) for s in signals}

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    self.requested = name
    for s in self._previous:
      signal.signal(s, signal.SIG_DFL)
    sys.stderr.write(f"\n{name} received: saving a checkpoint after the current step, then exiting. "
                     "Send it again to exit at once without a checkpoint.\n")
    sys.stderr.flush()

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
