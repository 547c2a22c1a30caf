"""The transport of a dispatcher, and routes over it.

Transport: every collective of moetron.comm (the row all-to-alls and the count exchanges of dispatch and
combine, both directions, forward and backward) goes through one object, owned by whoever builds the
dispatchers (one per model replica), so that these can be switched on per model, not per process:
- a link model (comm/link_model.py): handles complete no earlier than the modelled transfer time;
- twin process groups (comm/overlap.py): the transfers of a backward pass (dispatch-bwd, combine-bwd) go
  to a twin of each group, so that an overlapped pair's forward and backward chunk never have to issue
  their collectives in one agreed order across ranks; which group a transfer takes follows from its
  direction, never from the thread that issues it;
- the running overlapped pair (comm/overlap.py): before the consumer of a transfer waits for it, the
  other chunk of the pair enqueues its work (`Pending.wait`);
- a recorder (comm/recorder.py) of when each collective was issued and waited for, and a stream recorder
  (comm/stream_model.py) of the order in which transfers and their waits reach a GPU's streams;
- a wait clock: any object whose `measure()` context manager times each wait on a collective (a training
  loop's count of the time blocked on expert-parallel communication);
- a flight recorder (comm/recorder.py) of the rank's recent collectives, for a hang watchdog.

A *transfer* is what a consumer waits for: one dispatch, combine, or the backward of one, with all its
hops and count exchanges (one communication kernel on a GPU, as DeepEP's). `open_transfer` starts one,
the collectives issued inside `issuing(transfer)` belong to it, and a `Pending` made with the transport
is its consumer's wait.

Routes: a chain of all-to-all hops that moves rows of bytes from their home rank to where they are
needed ("forward", the dispatch direction), and its adjoint that brings rows back and sums the copies
of each row at every hop ("reverse", the combine direction). A hop sends rows `send_index` of its input
buffer (grouped by destination: `send_splits[p]` rows for group member p) and receives `recv_splits[p]`
rows from member p, in member order. Reverse runs the same hop with the splits swapped and index-adds
what comes back into the rows they were taken from.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .link_model import LinkModel
from .payload import from_bytes, to_bytes
from .recorder import FlightRecorder, Recorder, Span, current_rank
from .stats import CommStats
from .stream_model import StreamRecorder


class Transport:
    """Where the collectives of moetron.comm are issued. `link` (a LinkModel), `recorder` (a Recorder) and
    `streams` (a StreamRecorder) may be set or cleared at any time; `pair` is set by comm/overlap.py while an
    overlapped F&B pair runs (it has `hand_over()` and `turn`, the side that runs); `wait_clock` (an object
    with a `measure()` context manager) times every wait on a collective."""

    def __init__(self, link: LinkModel | None = None, recorder: Recorder | None = None,
                 streams: StreamRecorder | None = None, flight: FlightRecorder | None = None):
        self.link, self.recorder, self.streams, self.flight = link, recorder, streams, flight
        self.wait_clock = None
        self.twins: dict = {}  # process group -> its twin, for the transfers of backward passes
        self.pair = None  # the running overlapped pair (comm/overlap.py)
        self.current: int | None = None  # the stream recorder's transfer whose collectives are being issued

    def role(self) -> str:
        """The side of a running F&B pair whose work runs now ("-": no pair is running)."""
        return "-" if self.pair is None else self.pair.turn

    def register_twin(self, group: dist.ProcessGroup | None, twin: dist.ProcessGroup | None) -> None:
        """Use `twin` (a process group of the same ranks) for the backward transfers on `group`."""
        if group is None or twin is None:
            return
        if dist.get_process_group_ranks(group) != dist.get_process_group_ranks(twin):
            raise ValueError(f"a twin group must hold the same ranks: {dist.get_process_group_ranks(group)} vs "
                             f"{dist.get_process_group_ranks(twin)}")
        self.twins[group] = twin

    def _route(self, group, backward: bool):
        """The group a transfer takes: the twin of `group` for a backward transfer, if there is one."""
        if not backward:
            return group
        twin = self.twins.get(group)
        if twin is not None:
            return twin
        if self.pair is not None:
            raise RuntimeError(
                "an overlapped F&B pair's backward chunk issued a collective on a process group without a twin; "
                "create twins once at setup (collective) with moetron.comm.overlap.enable_overlap(transport, ep, "
                "partition, ranks_per_node) or transport.register_twin(group, twin)")
        return group

    # ---- transfers: what a consumer waits for -----------------------------------------------------------
    def open_transfer(self, what: str) -> int | None:
        """A transfer reaches the (modelled) communication stream; its id for the stream recorder (None
        without one). Issue its collectives inside `issuing(id)`."""
        return self.streams.issue(what) if self.streams is not None else None

    @contextlib.contextmanager
    def issuing(self, transfer: int | None):
        """Collectives issued inside belong to `transfer` (its hops, its count exchanges)."""
        previous, self.current = self.current, transfer
        try:
            yield
        finally:
            self.current = previous

    def before_consumer(self, transfer: int | None) -> None:
        """The consumer of `transfer` is next: the other side of a running pair enqueues its work first
        (up to its own next wait), then this side's wait reaches the compute stream."""
        if self.pair is not None:
            self.pair.hand_over()
        if self.streams is not None and transfer is not None:
            self.streams.wait(transfer)

    def _note_hop(self, group, send_splits: list[int], recv_splits: list[int], row_bytes: int) -> None:
        """Count a collective's bytes into the current transfer of the stream recorder."""
        streams = self.streams
        if streams is None:
            return
        transfer = self.current
        if transfer is None:  # a collective outside any transfer: a transfer of its own, waited for at once
            transfer = streams.issue("other")
            streams.wait(transfer)
        streams.hop(transfer, *self.link_bytes(streams.link, group, send_splits, recv_splits, row_bytes))

    def _book(self, group, send_splits: list[int], recv_splits: list[int], row_bytes: int) -> float | None:
        """The link model's deadline for this transfer (None without a link model)."""
        if self.link is None:
            return None
        return self.link.issue(*self.link_bytes(self.link, group, send_splits, recv_splits, row_bytes))

    def link_bytes(self, model: LinkModel, group, send_splits: list[int], recv_splits: list[int],
                   row_bytes: int) -> tuple[int, int]:
        """(intra-node, inter-node) bytes of a collective on `model`'s links (rows to myself are free)."""
        peers = dist.get_process_group_ranks(group)
        return model.peer_bytes(peers, peers.index(dist.get_rank()), send_splits, recv_splits, row_bytes)

    def all_to_all(self, buf: torch.Tensor, group, send_splits: list[int], recv_splits: list[int], what: str,
                   async_op: bool = False, backward: bool = False):
        """Uneven all-to-all of rows (`what` labels it in the recorder; `backward`: a transfer of a backward
        pass, on the twin group). Returns (received rows, handle or None)."""
        if group is None:
            return buf.clone(), None
        group = self._route(group, backward)
        issued = time.perf_counter()
        row_bytes = buf[:1].numel() * buf.element_size()
        deadline = self._book(group, send_splits, recv_splits, row_bytes)
        self._note_hop(group, send_splits, recv_splits, row_bytes)
        out = buf.new_empty((sum(recv_splits),) + tuple(buf.shape[1:]))
        flight = self._issue(group, what, row_bytes * sum(send_splits))
        work = dist.all_to_all_single(out, buf.contiguous(), recv_splits, send_splits, group=group, async_op=True)
        handle = Handle(self, work, issued, deadline, what, flight)
        if async_op:
            return out, handle
        handle.wait()
        return out, None

    def exchange_counts(self, group, size: int, send_splits: list[int], device: torch.device) -> list[int]:
        """Tell every member how many rows it will get from me; learn how many I get from each."""
        if group is None:
            return list(send_splits)
        issued = time.perf_counter()
        deadline = self._book(group, [1] * size, [1] * size, 8)
        self._note_hop(group, [1] * size, [1] * size, 8)
        send = torch.tensor(send_splits, dtype=torch.int64, device=device)
        recv = torch.empty(size, dtype=torch.int64, device=device)
        flight = self._issue(group, "counts", 8 * size)
        Handle(self, dist.all_to_all_single(recv, send, group=group, async_op=True), issued, deadline, "counts",
               flight).wait()
        return recv.tolist()

    def _issue(self, group, what: str, nbytes: int):
        return None if self.flight is None else self.flight.issue("all_to_all", group, what=what, nbytes=nbytes)


class Handle:
    """The real work, held back by the link model (if any) and recorded (if a recorder is set)."""

    def __init__(self, transport: Transport, work, issued: float, deadline: float | None, what: str, flight=None):
        self.transport, self.work, self.issued, self.deadline, self.what = transport, work, issued, deadline, what
        self.role, self.flight, self.flights = transport.role(), flight, transport.flight

    def wait(self) -> bool:
        transport = self.transport
        t0 = time.perf_counter()
        if self.flight is not None:
            self.flights.wait(self.flight)
        with transport.wait_clock.measure() if transport.wait_clock is not None else contextlib.nullcontext():
            if self.deadline is not None and transport.link is not None:
                transport.link.delay(self.work, self.deadline).wait()
            else:
                self.work.wait()
        t1 = time.perf_counter()
        if self.flight is not None:
            self.flights.done(self.flight)
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
    """A transfer in flight: wait() finishes the remaining steps and returns the result. Made with the
    `transport` (and the stream recorder's `transfer` id), it is the wait of the transfer's consumer: the
    other side of a running pair enqueues its work first (Transport.before_consumer)."""

    def __init__(self, work, finish, transport: Transport | None = None, transfer: int | None = None):
        self._work, self._finish, self._done, self._result = work, finish, False, None
        self._transport, self._transfer = transport, transfer

    def wait(self):
        if not self._done:
            transport = self._transport
            if transport is not None:
                transport.before_consumer(self._transfer)
            fused = transport is not None and (transport.streams is None or transport.streams.fused)
            with transport.issuing(self._transfer if fused else None) if transport is not None \
                    else contextlib.nullcontext():
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
        """Send home rows [T, B] (uint8) along every hop; returns the destination rows [N, B]. The backward
        of combine (a dispatch of gradients): its transfers take the twin groups."""
        return self.forward_async(buf, stats, kind, what).wait()

    def forward_async(self, buf: torch.Tensor, stats: CommStats | None = None, kind: str = "backward",
                      what: str = "combine-bwd") -> Pending:
        """forward_bytes as a transfer: the first hop is in flight when this returns; wait() (the consumer's
        wait) runs the other hops and returns the destination rows."""
        transport = self.transport

        def send(hop: Hop, rows: torch.Tensor, is_async: bool):
            if stats is not None:
                stats.add(kind, *hop.bytes_to_peers(hop.send_splits, rows.shape[1]))
            return transport.all_to_all(rows[hop.send_index], hop.group, hop.send_splits, hop.recv_splits, what,
                                        async_op=is_async, backward=True)

        transfer = transport.open_transfer(what)
        with transport.issuing(transfer):
            first, work = send(self.hops[0], buf, True)

        def finish() -> torch.Tensor:
            rows = first
            for hop in self.hops[1:]:
                rows, _ = send(hop, rows, False)
            return rows if self.perm is None else rows[self.perm]

        return Pending(work, finish, transport, transfer)

    def reverse(self, tensors: list[torch.Tensor], wire: list[torch.dtype], stats: CommStats | None = None,
                kind: str = "combine", async_op: bool = False, what: str = "combine", backward: bool = False) -> Pending:
        """Bring destination rows [N, C_i] back home, summing the copies of a row at every hop (in FP32,
        sent in the `wire` dtypes; `backward`: the backward of dispatch, on the twin groups). Returns a
        Pending whose wait() gives FP32 [T, C_i] tensors (the caller's transfer: issue it inside
        `transport.issuing`, and make the consumer's Pending)."""
        if self.perm is not None:
            tensors = [t.new_empty(t.shape).index_copy_(0, self.perm, t) for t in tensors]
        specs = [(t.shape[1], dt) for t, dt in zip(tensors, wire)]
        hops = list(reversed(self.hops))

        def send(hop: Hop, parts: list[torch.Tensor], is_async: bool):
            buf = to_bytes([p.to(dt) for p, dt in zip(parts, wire)])
            if stats is not None:
                stats.add(kind, *hop.bytes_to_peers(hop.recv_splits, buf.shape[1]))
            return self.transport.all_to_all(buf, hop.group, hop.recv_splits, hop.send_splits, what, async_op=is_async,
                                             backward=backward)

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
