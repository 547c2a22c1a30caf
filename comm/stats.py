"""Byte counters: what each dispatch / combine sent to other ranks, inside the node and across nodes.

Counted: payload rows sent to a rank other than this one (a row kept on the same rank is a local copy
and costs nothing). Not counted: the per-hop count exchange (one int64 per peer)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


@dataclass
class CommStats:
    dispatch_calls: int = 0
    combine_calls: int = 0
    dispatch_intra_bytes: int = 0
    dispatch_inter_bytes: int = 0
    combine_intra_bytes: int = 0
    combine_inter_bytes: int = 0
    backward_intra_bytes: int = 0  # the gradient transfers of backward passes (both directions)
    backward_inter_bytes: int = 0
    # The overlapped F&B pair counts from two threads at once (forward and backward chunks).
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, kind: str, intra: int, inter: int) -> None:
        with self._lock:
            setattr(self, f"{kind}_intra_bytes", getattr(self, f"{kind}_intra_bytes") + intra)
            setattr(self, f"{kind}_inter_bytes", getattr(self, f"{kind}_inter_bytes") + inter)

    def add_call(self, kind: str) -> None:
        with self._lock:
            setattr(self, f"{kind}_calls", getattr(self, f"{kind}_calls") + 1)

    def counters(self) -> list[str]:
        return [f.name for f in fields(self) if not f.name.startswith("_")]

    def reset(self) -> None:
        with self._lock:
            for name in self.counters():
                setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.counters()}
