"""
Stopping a training run cleanly. Ctrl-C and SIGTERM (sent by `kill`, schedulers, shutdowns;
torchrun passes them on to every rank) ask train.py's loop to save last/ and stop at the end of
the current step; a second one stops at once (the previous last/ survives). Ranks agree on the
stop step: any rank's request counts.
"""

import signal
from pathlib import Path

import torch.distributed as dist

from ranks import all_ranks


class StopRequest:
    """While in a `with` block, Ctrl-C and SIGTERM are noted rather than fatal (the second one is)."""

    def __init__(self, last: Path, write):
        self.last, self.write, self.signum = last, write, 0

    def __enter__(self):
        self.handlers = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self.handlers.items():
            signal.signal(s, h)

    def request(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        self.write(f"{signal.Signals(signum).name}: saving {self.last} at the end of this step "
                   f"(again to quit without saving)")

    def agreed(self, device) -> int:
        """The signal any rank has received (0: none), the same on every rank."""
        return int(all_ranks([self.signum], device, dist.ReduceOp.MAX)[0])
