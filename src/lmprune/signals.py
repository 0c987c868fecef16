"""SIGTERM / SIGINT during training: finish the step in flight, checkpoint, exit 143 / 130.

`StopRequests` installs handlers for the life of the loop (main thread only). The first signal is
only recorded; the loop asks `requested()` after every step, and under torchrun the answer is
all-reduced (MAX), so every rank stops after the same step and takes part in the checkpoint. A
second Ctrl-C raises KeyboardInterrupt at once (a user who presses it twice is not kept waiting); a
repeated SIGTERM is ignored, because launchers (torchrun, Slurm) forward it to every worker again.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. nohup / a background job: keep ignoring
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:  # the second Ctrl-C: give up waiting
            signal.signal(signum, self._previous.get(signum, signal.default_int_handler))
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def requested(self, world_size: int = 1, device: torch.device | None = None) -> int:
        """The signal number every rank agrees to stop on after this step (0 = go on)."""
        if world_size == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
