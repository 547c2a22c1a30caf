"""Recorders of collectives. `Recorder`: when each collective of a Transport was issued and waited for, the
timeline of benchmarks/overlap.py. (The order in which work would reach a GPU's streams is
comm/stream_model.py's.) `FlightRecorder`: a rank's last few collectives of every kind, with those still
incomplete, which the hang watchdog writes out when the rank stops making progress."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import torch.distributed as dist


def current_rank() -> int:
    """This process's global rank (0 without a process group): the rank a Span is recorded under."""
    return dist.get_rank() if dist.is_initialized() else 0


@dataclass
class Span:
    rank: int
    role: str  # "F" (forward chunk), "B" (backward chunk) or "-" (not inside an F&B pair)
    kind: str  # "comm": issue -> data usable; "wait": the thread blocked on it
    start: float  # time.perf_counter() seconds
    end: float
    what: str = ""  # counts, dispatch, combine, combine-bwd (a dispatch of gradients), dispatch-bwd


@dataclass
class Recorder:
    """Collects Spans and labelled marks; thread-safe (the two chunks of a pair run on their own stacks)."""

    spans: list[Span] = field(default_factory=list)
    marks: list[tuple[int, str, str, float]] = field(default_factory=list)  # (rank, role, label, time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, span: Span) -> None:
        with self._lock:
            self.spans.append(span)

    def mark(self, rank: int, role: str, label: str) -> None:
        with self._lock:
            self.marks.append((rank, role, label, time.perf_counter()))


@dataclass
class Flight:
    """One collective or transfer as this rank saw it: issued, and completed (None: not yet)."""

    seq: int
    kind: str  # all_reduce | reduce_scatter | all_gather | all_to_all | broadcast | barrier | send | recv | ...
    group: str  # the group's name ("world", "pp", "ep", ...) or its global ranks
    ranks: list[int]  # the global ranks that must take part (a send or receive: the peer)
    what: str  # what it carries: "loss sums", "dispatch", "act", "grad", ...
    bytes: int
    issued: float  # time.time() seconds (comparable across the ranks of one machine or an NTP-synced cluster)
    completed: float | None = None
    waited: float | None = None  # when this rank began to block on it (None: not yet)
    micro_batch: int | None = None
    layer: int | None = None


class FlightRecorder:
    """The last `capacity` collectives of this rank, and every one still incomplete, for the hang watchdog
    (moetron/monitor/watchdog.py). The code that issues a collective calls `issue`, `wait` when it blocks on
    it and `done` once it completed (or wraps a blocking call in `op`). Thread-safe; a recorder per rank, owned by its trainer.
    `beat(step)` marks progress that issues nothing (a step begins). On a GPU `done` follows the enqueue, not
    the kernel: NCCL's own timeout covers the kernel."""

    def __init__(self, rank: int, capacity: int = 64, clock=time.time):
        self.rank, self.clock = rank, clock
        self.step = 0
        self.last_activity = clock()
        self._seq = 0
        self._ring: deque[Flight] = deque(maxlen=capacity)
        self._open: dict[int, Flight] = {}
        self._names: dict[int, tuple[object, str, list[int]]] = {}  # id(group) -> (group, name, ranks)
        self._local = threading.local()  # micro_batch / layer of the work running on this thread
        self._lock = threading.Lock()

    def name_group(self, group, name: str) -> None:
        """Call `group` by `name` in the records (e.g. "pp", "ep")."""
        self._names[id(group)] = (group, name, self._ranks(group))

    def _describe(self, group) -> tuple[str, list[int]]:
        known = self._names.get(id(group))
        if known is None:
            ranks = self._ranks(group)
            known = (group, "world" if group is None else "ranks " + ",".join(map(str, ranks)), ranks)
            self._names[id(group)] = known
        return known[1], known[2]

    @staticmethod
    def _ranks(group) -> list[int]:
        if not dist.is_initialized():
            return [0]
        return list(range(dist.get_world_size())) if group is None else dist.get_process_group_ranks(group)

    @contextlib.contextmanager
    def context(self, micro_batch: int | None = None, layer: int | None = None):
        """Collectives issued on this thread inside belong to `micro_batch` / `layer`."""
        previous = getattr(self._local, "where", (None, None))
        self._local.where = (micro_batch if micro_batch is not None else previous[0],
                             layer if layer is not None else previous[1])
        try:
            yield
        finally:
            self._local.where = previous

    def issue(self, kind: str, group=None, *, what: str = "", nbytes: int = 0, peer: int | None = None,
              micro_batch: int | None = None, layer: int | None = None) -> Flight:
        """A collective on `group` (a send/receive: with global rank `peer`) was issued now."""
        if peer is not None:
            name, ranks = f"{'pp' if group is None else self._describe(group)[0]} peer {peer}", [peer]
        else:
            name, ranks = self._describe(group)
        where = getattr(self._local, "where", (None, None))
        now = self.clock()
        with self._lock:
            self._seq += 1
            flight = Flight(self._seq, kind, name, ranks, what, int(nbytes), now,
                            micro_batch=micro_batch if micro_batch is not None else where[0],
                            layer=layer if layer is not None else where[1])
            self._ring.append(flight)
            self._open[flight.seq] = flight
            self.last_activity = now
        return flight

    def wait(self, flight: Flight) -> None:
        """This rank now blocks until `flight` completes (what a hang report names)."""
        if flight.waited is None:
            flight.waited = self.clock()

    def done(self, flight: Flight) -> None:
        now = self.clock()
        with self._lock:
            if flight.completed is None:
                flight.completed = now
            self._open.pop(flight.seq, None)
            self.last_activity = now

    @contextlib.contextmanager
    def op(self, kind: str, group=None, **details):
        """A blocking collective: issued on entry, completed on exit (not if it raised)."""
        flight = self.issue(kind, group, **details)
        flight.waited = flight.issued
        yield flight
        self.done(flight)

    def beat(self, step: int) -> None:
        """Progress without a collective: step `step` begins."""
        with self._lock:
            self.step, self.last_activity = step, self.clock()

    def idle_seconds(self) -> float:
        """Seconds since anything was issued or completed (or a step began)."""
        return self.clock() - self.last_activity

    def snapshot(self) -> dict:
        """The record as plain data: recent flights (oldest first) and every incomplete one."""
        with self._lock:
            flights = {f.seq: f for f in self._ring} | dict(self._open)
            return {"rank": self.rank, "step": self.step, "last_activity": self.last_activity,
                    "flights": [asdict(flights[s]) for s in sorted(flights)]}


def record(flight: FlightRecorder | None, kind: str, group=None, **details):
    """`flight.op(...)`, or nothing without a recorder."""
    return contextlib.nullcontext() if flight is None else flight.op(kind, group, **details)
