"""A recorder of when each collective of a Transport was issued and waited for: the timeline of
benchmarks/overlap.py. (The order in which work would reach a GPU's streams is comm/stream_model.py's.)"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

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
