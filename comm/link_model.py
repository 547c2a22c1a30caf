"""A link model: all-to-alls that take as long as they would on real links (arXiv 2412.19437 §3.2: NVLink inside a node,
InfiniBand across nodes), whatever the local transport does.

Each transfer is charged `latency + bytes / bandwidth` on the links it uses, with separate intra-node and
inter-node bandwidths (default 160 and 50 GB/s, times `scale`). A rank's sends and receives run on
full-duplex links, so a transfer needs max(bytes sent, bytes received) per link kind; the two kinds run in
parallel; transfers that overlap in time queue on a link (FIFO), so two concurrent all-to-alls share its
bandwidth. The handle of a transfer completes no earlier than that modelled time after issue: `wait()`
waits for the real transfer, then SLEEPS (never spins) until the modelled deadline, so the cores stay free
for the computation the transfer is meant to hide behind.

    transport = Transport(link=LinkModel(ranks_per_node=2, scale=1e-3))  # 160 / 50 MB/s: scaled down
    dispatcher = Dispatcher(ep, num_experts, transport=transport)        # its collectives are timed by it

`scale` slows both links by the same factor so that communication is comparable to computation at the
small sizes a CPU can run (a benchmark picks it from measured compute time; see benchmarks/overlap.py).
The clock and sleep are injectable, so the timing model is unit-testable with a fake clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

GB = 1e9


@dataclass
class LinkModel:
    ranks_per_node: int
    intra_gbps: float = 160.0  # GB/s per rank over NVLink (arXiv 2412.19437 §3.2, §5)
    inter_gbps: float = 50.0  # GB/s per rank over InfiniBand
    latency_s: float = 5e-6  # per transfer
    scale: float = 1.0  # multiplies both bandwidths (< 1: slower links)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    _free: dict[str, float] = field(default_factory=lambda: {"intra": 0.0, "inter": 0.0}, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    modelled_s: float = 0.0  # sum of the transfer times charged so far (latency included)
    transfers: int = 0

    def __post_init__(self) -> None:
        for name in ("ranks_per_node", "intra_gbps", "inter_gbps", "scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LinkModel.{name} must be positive, got {getattr(self, name)}")
        if self.latency_s < 0:
            raise ValueError(f"LinkModel.latency_s must be >= 0, got {self.latency_s}")

    @property
    def bandwidth(self) -> dict[str, float]:
        """Bytes per second per link kind, after scaling."""
        return {"intra": self.intra_gbps * GB * self.scale, "inter": self.inter_gbps * GB * self.scale}

    def transfer_time(self, intra_bytes: int, inter_bytes: int) -> float:
        """Seconds one transfer takes on idle links: latency + the slower of the two link kinds."""
        bw = self.bandwidth
        return self.latency_s + max(intra_bytes / bw["intra"], inter_bytes / bw["inter"])

    def issue(self, intra_bytes: int, inter_bytes: int, now: float | None = None) -> float:
        """Book a transfer issued at `now` (default: the clock) on the links; returns its deadline."""
        now = self.clock() if now is None else now
        bw = self.bandwidth
        with self._lock:
            end = now
            for kind, nbytes in (("intra", intra_bytes), ("inter", inter_bytes)):
                if nbytes > 0:
                    start = max(now, self._free[kind])
                    self._free[kind] = start + nbytes / bw[kind]
                    end = max(end, self._free[kind])
            self.modelled_s += self.transfer_time(intra_bytes, inter_bytes)
            self.transfers += 1
        return end + self.latency_s

    def peer_bytes(self, peers: list[int], me: int, send_splits: list[int], recv_splits: list[int],
                   row_bytes: int) -> tuple[int, int]:
        """(intra, inter) bytes of an all-to-all among global ranks `peers` (me = my index), per link kind the
        larger of what I send and what I receive; rows to or from myself cost nothing."""
        node = [g // self.ranks_per_node for g in peers]
        mine = node[me]
        totals = {"intra": [0, 0], "inter": [0, 0]}
        for p, (s, r) in enumerate(zip(send_splits, recv_splits)):
            if p == me:
                continue
            kind = "intra" if node[p] == mine else "inter"
            totals[kind][0] += s * row_bytes
            totals[kind][1] += r * row_bytes
        return max(totals["intra"]), max(totals["inter"])

    def delay(self, work, deadline: float) -> TimedWork:
        return TimedWork(work, deadline, self.clock, self.sleep)

    def reset(self) -> None:
        with self._lock:
            self._free = {"intra": 0.0, "inter": 0.0}
            self.modelled_s, self.transfers = 0.0, 0


class TimedWork:
    """A work handle that completes no earlier than `deadline` (on `clock`): wait() waits for the real work,
    then sleeps out the rest."""

    def __init__(self, work, deadline: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.work, self.deadline, self._clock, self._sleep = work, deadline, clock, sleep

    def wait(self) -> bool:
        if self.work is not None:
            self.work.wait()
        remaining = self.deadline - self._clock()
        if remaining > 0:
            self._sleep(remaining)
        return True

    def is_completed(self) -> bool:
        done = self.work is None or self.work.is_completed()
        return done and self._clock() >= self.deadline
