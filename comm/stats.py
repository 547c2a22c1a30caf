"""Byte counters: what each dispatch / combine sent to other ranks, inside the node and across nodes.

Counted: payload rows sent to a rank other than this one (a row kept on the same rank is a local copy
and costs nothing). Not counted: the per-hop count exchange (one int64 per peer)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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

    def add(self, kind: str, intra: int, inter: int) -> None:
        setattr(self, f"{kind}_intra_bytes", getattr(self, f"{kind}_intra_bytes") + intra)
        setattr(self, f"{kind}_inter_bytes", getattr(self, f"{kind}_inter_bytes") + inter)

    def reset(self) -> None:
        for name in asdict(self):
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
