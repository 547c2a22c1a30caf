"""The transport of a dispatcher, and routes over it.

Transport: every collective of moetron.comm (the row all-to-alls and the count exchanges of dispatch and
combine, both directions, forward and backward) goes through one object, owned by whoever builds the
dispatchers (one per model replica), so that three things can be switched on per model, not per process:
- a link model (comm/link_model.py): handles complete no earlier than the modelled transfer time;
- twin process groups for overlap (comm/overlap.py): while a forward and a backward chunk run at once,
  the backward side's collectives go to a twin of each group, so the two chunks never have to issue their
  collectives in one agreed order;
- a recorder (comm/recorder.py) of when each collective was issued and waited for.

Routes: a chain of all-to-all hops that moves rows of bytes from their home rank to where they are
needed ("forward", the dispatch direction), and its adjoint that brings rows back and sums the copies
of each row at every hop ("reverse", the combine direction). A hop sends rows `send_index` of its input
buffer (grouped by destination: `send_splits[p]` rows for group member p) and receives `recv_splits[p]`
rows from member p, in member order. Reverse runs the same hop with the splits swapped and index-adds
what comes back into the rows they were taken from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .link_model import LinkModel
from .payload import from_bytes, to_bytes
from .recorder import Recorder, Span, current_rank
from .stats import CommStats


class Transport:
    """Where the collectives of moetron.comm are issued. `link` (a LinkModel) and `recorder` (a Recorder)
    may be set or cleared at any time; `pair` is set by comm/overlap.py while an overlapped F&B pair runs."""

    def __init__(self, link: LinkModel | None = None, recorder: Recorder | None = None):
        self.link, self.recorder = link, recorder
        self.twins: dict = {}  # process group -> its twin, for the backward side of an overlapped pair
        self.pair = None  # the running overlapped pair (comm/overlap.py): who computes, which thread is which

    def role(self) -> str:
        """Which side of a running F&B pair the calling thread works for ("-": no pair is running)."""
        return "-" if self.pair is None else self.pair.role()

    def register_twin(self, group: dist.ProcessGroup | None, twin: dist.ProcessGroup | None) -> None:
        """Use `twin` (a process group of the same ranks) for the backward side's collectives on `group`."""
        if group is None or twin is None:
            return
        if dist.get_process_group_ranks(group) != dist.get_process_group_ranks(twin):
            raise ValueError(f"a twin group must hold the same ranks: {dist.get_process_group_ranks(group)} vs "
                             f"{dist.get_process_group_ranks(twin)}")
        self.twins[group] = twin

    def _route(self, group):
        """The group the calling thread must use: the twin for the backward side of a running pair."""
        if self.role() != "B":
            return group
        twin = self.twins.get(group)
        if twin is None:
            raise RuntimeError(
                "an overlapped F&B pair's backward chunk issued a collective on a process group without a twin; "
                "create twins once at setup (collective) with moetron.comm.overlap.enable_overlap(transport, ep, "
                "partition, ranks_per_node) or transport.register_twin(group, twin)")
        return twin

    def _book(self, group, send_splits: list[int], recv_splits: list[int], row_bytes: int) -> float | None:
        """The link model's deadline for this transfer (None without a link model)."""
        if self.link is None:
            return None
        peers = dist.get_process_group_ranks(group)
        intra, inter = self.link.peer_bytes(peers, peers.index(dist.get_rank()), send_splits, recv_splits,
                                            row_bytes)
        return self.link.issue(intra, inter)

    def all_to_all(self, buf: torch.Tensor, group, send_splits: list[int], recv_splits: list[int], what: str,
                   async_op: bool = False):
        """Uneven all-to-all of rows (`what` labels it in the recorder). Returns (received rows, handle or None)."""
        if group is None:
            return buf.clone(), None
        group = self._route(group)
        issued = time.perf_counter()
        row_bytes = buf[:1].numel() * buf.element_size()
        deadline = self._book(group, send_splits, recv_splits, row_bytes)
        out = buf.new_empty((sum(recv_splits),) + tuple(buf.shape[1:]))
        work = dist.all_to_all_single(out, buf.contiguous(), recv_splits, send_splits, group=group, async_op=True)
        handle = Handle(self, work, issued, deadline, what)
        if async_op:
            return out, handle
        handle.wait()
        return out, None

    def exchange_counts(self, group, size: int, send_splits: list[int], device: torch.device) -> list[int]:
        """Tell every member how many rows it will get from me; learn how many I get from each."""
        if group is None:
            return list(send_splits)
        group = self._route(group)
        issued = time.perf_counter()
        deadline = self._book(group, [1] * size, [1] * size, 8)
        send = torch.tensor(send_splits, dtype=torch.int64, device=device)
        recv = torch.empty(size, dtype=torch.int64, device=device)
        Handle(self, dist.all_to_all_single(recv, send, group=group, async_op=True), issued, deadline, "counts").wait()
        return recv.tolist()


class Handle:
    """The real work, held back by the link model (if any) and recorded (if a recorder is set). While it
    waits, the waiting side of an overlapped pair lets the other side compute."""

    def __init__(self, transport: Transport, work, issued: float, deadline: float | None, what: str):
        self.transport, self.work, self.issued, self.deadline, self.what = transport, work, issued, deadline, what
        self.role = transport.role()

    def wait(self) -> bool:
        transport = self.transport
        if transport.pair is not None:
            transport.pair.give_up_turn()
        t0 = time.perf_counter()
        if self.deadline is not None and transport.link is not None:
            transport.link.delay(self.work, self.deadline).wait()
        else:
            self.work.wait()
        t1 = time.perf_counter()
        if transport.recorder is not None:
            transport.recorder.add(Span(current_rank(), self.role, "comm", self.issued, t1, self.what))
            transport.recorder.add(Span(current_rank(), self.role, "wait", t0, t1, self.what))
        return True

    def is_completed(self) -> bool:
        return self.work.is_completed()


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


def make_hop(transport: Transport, group, me: int, remote: list[bool], dest_mask: torch.Tensor) -> Hop:
    """A hop that sends row i to every member p with dest_mask[i, p] (once per member: deduplicated),
    ordered by member then row."""
    members, rows = dest_mask.t().nonzero(as_tuple=True)
    send_splits = torch.bincount(members, minlength=len(remote)).tolist()
    recv_splits = transport.exchange_counts(group, len(remote), send_splits, dest_mask.device)
    return Hop(group, me, remote, rows, send_splits, recv_splits, dest_mask.shape[0])


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
    transport: Transport

    @property
    def num_tokens(self) -> int:
        return self.hops[0].num_src_rows

    def forward_bytes(self, buf: torch.Tensor, stats: CommStats | None = None, kind: str = "backward",
                      what: str = "combine-bwd") -> torch.Tensor:
        """Send home rows [T, B] (uint8) along every hop; returns the destination rows [N, B]."""
        for hop in self.hops:
            if stats is not None:
                stats.add(kind, *hop.bytes_to_peers(hop.send_splits, buf.shape[1]))
            buf, _ = self.transport.all_to_all(buf[hop.send_index], hop.group, hop.send_splits, hop.recv_splits, what)
        return buf if self.perm is None else buf[self.perm]

    def reverse(self, tensors: list[torch.Tensor], wire: list[torch.dtype], stats: CommStats | None = None,
                kind: str = "combine", async_op: bool = False, what: str = "combine") -> Pending:
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
            return self.transport.all_to_all(buf, hop.group, hop.recv_splits, hop.send_splits, what, async_op=is_async)

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
