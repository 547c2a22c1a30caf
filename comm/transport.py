"""Routes: a chain of all-to-all hops that moves rows of bytes from their home rank to where they are
needed ("forward", the dispatch direction), and its adjoint that brings rows back and sums the copies
of each row at every hop ("reverse", the combine direction).

A hop sends rows `send_index` of its input buffer (grouped by destination: `send_splits[p]` rows for
group member p) and receives `recv_splits[p]` rows from member p, in member order. Reverse runs the
same hop with the splits swapped and index-adds what comes back into the rows they were taken from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .payload import from_bytes, to_bytes
from .stats import CommStats


@dataclass
class Hop:
    group: dist.ProcessGroup | None  # None: a group of one (this rank), no communication
    me: int  # my index in the group
    remote: list[bool]  # per group member: on another node than me
    send_index: torch.Tensor  # [rows sent] rows of the hop's input, grouped by destination member
    send_splits: list[int]
    recv_splits: list[int]
    num_src_rows: int  # rows of the hop's input buffer

    @property
    def size(self) -> int:
        return len(self.remote)

    def bytes_to_peers(self, splits: list[int], width: int) -> tuple[int, int]:
        """(intra-node, inter-node) bytes of a send with these splits, self excluded."""
        intra = sum(n for p, n in enumerate(splits) if p != self.me and not self.remote[p]) * width
        inter = sum(n for p, n in enumerate(splits) if p != self.me and self.remote[p]) * width
        return intra, inter


def exchange_counts(group: dist.ProcessGroup | None, size: int, send_splits: list[int],
                    device: torch.device | str = "cpu") -> list[int]:
    """Tell every member how many rows it will get from me; learn how many I get from each."""
    if group is None:
        return list(send_splits)
    send = torch.tensor(send_splits, dtype=torch.int64, device=device)
    recv = torch.empty(size, dtype=torch.int64, device=device)
    dist.all_to_all_single(recv, send, group=group)
    return recv.tolist()


def make_hop(group, me: int, remote: list[bool], dest_mask: torch.Tensor) -> Hop:
    """A hop that sends row i to every member p with dest_mask[i, p] (once per member: deduplicated),
    ordered by member then row."""
    members, rows = dest_mask.t().nonzero(as_tuple=True)
    send_splits = torch.bincount(members, minlength=len(remote)).tolist()
    recv_splits = exchange_counts(group, len(remote), send_splits, dest_mask.device)
    return Hop(group, me, remote, rows, send_splits, recv_splits, dest_mask.shape[0])


def all_to_all(buf: torch.Tensor, group, send_splits: list[int], recv_splits: list[int], async_op: bool = False):
    """Uneven all-to-all of rows. Returns (received rows, work handle or None)."""
    if group is None:
        return buf.clone(), None
    out = buf.new_empty((sum(recv_splits),) + tuple(buf.shape[1:]))
    work = dist.all_to_all_single(out, buf.contiguous(), recv_splits, send_splits, group=group, async_op=async_op)
    return out, work


def choice_mask(target: torch.Tensor, size: int) -> torch.Tensor:
    """[T, K] member ids (or -1 for none) -> bool [T, size]: row t goes to member p at least once."""
    target = torch.where(target >= 0, target, size)
    mask = torch.zeros(target.shape[0], size + 1, dtype=torch.bool, device=target.device)
    return mask.scatter_(1, target, True)[:, :size]


class Pending:
    """A transfer in flight: wait() finishes the remaining steps and returns the result."""

    def __init__(self, work, finish):
        self._work, self._finish, self._done, self._result = work, finish, False, None

    def wait(self):
        if not self._done:
            if self._work is not None:
                self._work.wait()
            self._result, self._done = self._finish(), True
        return self._result


@dataclass
class Route:
    hops: list[Hop]
    perm: torch.Tensor | None  # final reordering of the last hop's rows (None: keep their order)

    @property
    def num_tokens(self) -> int:
        return self.hops[0].num_src_rows

    def forward_bytes(self, buf: torch.Tensor, stats: CommStats | None = None, kind: str = "backward") -> torch.Tensor:
        """Send home rows [T, B] (uint8) along every hop; returns the destination rows [N, B]."""
        for hop in self.hops:
            if stats is not None:
                stats.add(kind, *hop.bytes_to_peers(hop.send_splits, buf.shape[1]))
            buf, _ = all_to_all(buf[hop.send_index], hop.group, hop.send_splits, hop.recv_splits)
        return buf if self.perm is None else buf[self.perm]

    def reverse(self, tensors: list[torch.Tensor], wire: list[torch.dtype], stats: CommStats | None = None,
                kind: str = "combine", async_op: bool = False) -> Pending:
        """Bring destination rows [N, C_i] back home, summing the copies of a row at every hop (in FP32,
        sent in the `wire` dtypes). Returns a Pending whose wait() gives FP32 [T, C_i] tensors."""
        if self.perm is not None:
            tensors = [t.new_empty(t.shape).index_copy_(0, self.perm, t) for t in tensors]
        specs = [(t.shape[1], dt) for t, dt in zip(tensors, wire)]
        hops = list(reversed(self.hops))

        def send(hop: Hop, parts: list[torch.Tensor], is_async: bool):
            buf = to_bytes([p.to(dt) for p, dt in zip(parts, wire)])
            if stats is not None:
                stats.add(kind, *hop.bytes_to_peers(hop.recv_splits, buf.shape[1]))
            return all_to_all(buf, hop.group, hop.recv_splits, hop.send_splits, async_op=is_async)

        def land(hop: Hop, buf: torch.Tensor) -> list[torch.Tensor]:
            parts = from_bytes(buf, specs)
            return [torch.zeros(hop.num_src_rows, p.shape[1], dtype=torch.float32, device=p.device)
                    .index_add_(0, hop.send_index, p.float()) for p in parts]

        first, work = send(hops[0], tensors, async_op)

        def finish():
            parts = land(hops[0], first)
            for hop in hops[1:]:
                buf, _ = send(hop, parts, False)
                parts = land(hop, buf)
            return parts

        return Pending(work, finish)
