"""Where a step's time goes, as a GPU user reads it: the phases of a step (data, forward-backward, optimizer,
checkpoint) and the time spent blocked on communication (expert-parallel all-to-all waits, data-parallel /
ZeRO gradient and parameter collectives).

Phases are host wall time, each closed by a device synchronize (moetron.device.synchronize, nothing on the
CPU) so the kernels a phase queued are charged to it. Cost on a GPU: one synchronize per phase, four per
step; the step already blocks the host on the loss (.tolist()) and the grad norm (.item()), so what is lost
is only the host queueing ahead across a phase boundary.

Waits: a WaitClock sums the time spent inside `with clock.measure():` around each wait. On the CPU a wait
blocks the host, so the host's clock measures it. On a GPU a wait blocks the compute stream, not the host:
the clock records a pair of timing events on the current stream around it and reads their elapsed time at
the end of the step, adding no synchronize of its own.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import torch

from moetron import device as dev

PHASES = ("data", "forward_backward", "optimizer", "checkpoint")


class PhaseClock:
    """Seconds per phase of the current step (`take` reads and clears them)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            dev.synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, dict.fromkeys(PHASES, 0.0)
        return out


class WaitClock:
    """Total time blocked in the measured waits since the last `take` (thread-safe: the two chunks of an
    overlapped forward-backward pair wait on their own threads, one at a time)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._host = 0.0
        self._events: list = []
        self._lock = threading.Lock()

    @contextmanager
    def measure(self):
        start_event, start = dev.timing_event(self.device), time.perf_counter()
        try:
            yield
        finally:
            if start_event is None:
                spent = time.perf_counter() - start
                with self._lock:
                    self._host += spent
            else:
                end_event = dev.timing_event(self.device)
                with self._lock:
                    self._events.append((start_event, end_event))

    def take(self) -> float:
        with self._lock:
            host, events = self._host, self._events
            self._host, self._events = 0.0, []
        return host + sum(dev.elapsed_seconds(a, b) for a, b in events)


def share(seconds: float, step_time: float) -> float:
    """The fraction of the step spent in `seconds`, in [0, 1] (clock noise cannot push it out)."""
    return min(max(seconds / step_time, 0.0), 1.0) if step_time > 0 else 0.0
