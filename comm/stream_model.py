"""A model of a GPU's streams: what an overlapped F&B pair would do on one compute stream and one communication
stream, recorded on any machine (arXiv 2412.19437 §3.2.1: the all-to-alls of one chunk hide behind the other
chunk's computation).

On a GPU the host only enqueues: kernels run in the order they reach the compute stream, a wait for a
transfer makes the compute stream (not the host) stop until the transfer is done, and transfers run in the
order they reach the communication stream. Whether overlap holds therefore depends only on that order, which
this module records per rank while the real code runs (on CPU, with gloo):

  Kernel(side, seconds)    a GEMM-bearing module's forward, input-gradient or weight-gradient work, at the
                           compute model's cost (comm/compute_model.py); other ops are free
  Issue(transfer, side)    a transfer (a whole dispatch, combine or the backward of one, all its hops and
                           count exchanges, as one communication kernel such as DeepEP's; with fused=False
                           the hops after the first are separate transfers, issued and waited for by the
                           consumer, as moetron's two-hop code does) reaches the communication stream; it
                           cannot start before the compute enqueued before it is done
  Wait(transfer, side)     the consumer of that transfer is about to be enqueued: the compute stream waits

and replays it: one in-order compute queue, one in-order communication queue, each transfer taking the link
model's time for its bytes (comm/link_model.py, idle links: the queue already serializes transfers). Ranks
are taken as symmetric (a collective starts when this rank issues it).

    streams = StreamRecorder(LinkModel(ranks_per_node=2))
    transport.streams = streams; compute_model.streams = streams
    ... run an overlapped pair ...
    result = replay(streams.segment("pair"), streams.link)   # makespan, compute, comm, efficiency
    crossings(streams.segment("pair"), streams.link)         # [] when no side's compute queues behind the
                                                             # other side's wait
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .link_model import LinkModel


@dataclass
class Kernel:
    side: str  # "F", "B" (a side of an overlapped pair) or "-"
    seconds: float
    label: str = ""


@dataclass
class Issue:
    transfer: int
    side: str
    what: str


@dataclass
class Wait:
    transfer: int
    side: str


@dataclass
class Mark:
    label: str  # "<name> start" / "<name> end": the bounds of a segment


Event = Kernel | Issue | Wait | Mark


@dataclass
class StreamRecorder:
    """The enqueue order of one rank. `side` is the side of a pair whose work is being enqueued now (set by
    the pair at each hand-over; "-" outside pairs)."""

    link: LinkModel
    events: list[Event] = field(default_factory=list)
    hops: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # transfer -> (intra, inter) bytes/hop
    side: str = "-"
    # True: a transfer's later hops belong to it (one communication kernel, as DeepEP's two-hop kernels).
    # False: as moetron's two-hop code issues them: the hops after the first are issued by the consumer, after
    # its wait, and waited for at once (each its own transfer).
    fused: bool = True

    def kernel(self, seconds: float, label: str = "") -> None:
        self.events.append(Kernel(self.side, seconds, label))

    def issue(self, what: str) -> int:
        """A transfer reaches the communication stream; returns its id (its hops follow with `hop`)."""
        transfer = len(self.hops)
        self.hops[transfer] = []
        self.events.append(Issue(transfer, self.side, what))
        return transfer

    def hop(self, transfer: int, intra_bytes: int, inter_bytes: int) -> None:
        self.hops[transfer].append((intra_bytes, inter_bytes))

    def wait(self, transfer: int) -> None:
        self.events.append(Wait(transfer, self.side))

    def mark(self, label: str) -> None:
        self.events.append(Mark(label))

    def segments(self, name: str) -> list[list[Event]]:
        """The events between each "<name> start" and the next "<name> end"."""
        out, current = [], None
        for event in self.events:
            if isinstance(event, Mark) and event.label == f"{name} start":
                current = []
            elif isinstance(event, Mark) and event.label == f"{name} end" and current is not None:
                out.append(current)
                current = None
            elif current is not None:
                current.append(event)
        return out

    def segment(self, name: str) -> list[Event]:
        """The last segment called `name`."""
        found = self.segments(name)
        if not found:
            raise ValueError(f"no segment {name!r} was recorded")
        return found[-1]

    def transfer_seconds(self, transfer: int, link: LinkModel | None = None) -> float:
        """A transfer's time on idle links: its hops one after the other (each needs the previous one's rows)."""
        link = link or self.link
        return sum(link.transfer_time(intra, inter) for intra, inter in self.hops.get(transfer, []))


@dataclass
class Stall:
    side: str  # the side whose wait stopped the compute stream
    what: str  # the transfer it waited for
    seconds: float
    next_side: str | None  # the side of the next kernel on the compute stream (None: no kernel followed)


@dataclass
class Replay:
    makespan: float
    compute: float  # sum of the kernels
    comm: float  # sum of the transfers
    stalls: list[Stall]

    @property
    def efficiency(self) -> float:
        """(compute + comm - makespan) / min(compute, comm): 1 = the smaller of the two fully hidden."""
        return (self.compute + self.comm - self.makespan) / max(min(self.compute, self.comm), 1e-12)


def replay(events: list[Event], recorder: StreamRecorder, link: LinkModel | None = None) -> Replay:
    """Run the recorded enqueue order on one in-order compute queue and one in-order communication queue."""
    compute_free = comm_free = 0.0
    compute = comm = 0.0
    done: dict[int, float] = {}
    what: dict[int, str] = {}
    stalls: list[Stall] = []
    pending_stall: Stall | None = None
    for event in events:
        if isinstance(event, Kernel):
            compute_free += event.seconds
            compute += event.seconds
            if pending_stall is not None:
                pending_stall.next_side = event.side
                pending_stall = None
        elif isinstance(event, Issue):
            seconds = recorder.transfer_seconds(event.transfer, link)
            start = max(comm_free, compute_free)  # its input is ready once the compute before it is done
            comm_free = done[event.transfer] = start + seconds
            comm += seconds
            what[event.transfer] = event.what
        elif isinstance(event, Wait):
            ready = done.get(event.transfer, 0.0)
            if ready > compute_free:
                pending_stall = Stall(event.side, what.get(event.transfer, "?"), ready - compute_free, None)
                stalls.append(pending_stall)
                compute_free = ready
    return Replay(max(compute_free, comm_free), compute, comm, stalls)


def crossings(events: list[Event], recorder: StreamRecorder, link: LinkModel | None = None) -> list[Stall]:
    """The stalls in which one side's wait for a transfer holds back the OTHER side's compute: its next kernel
    on the compute stream belongs to the other side, so the two chunks' work is serialized behind the
    transfer instead of overlapping it."""
    return [s for s in replay(events, recorder, link).stalls
            if s.next_side is not None and s.next_side != s.side and "-" not in (s.side, s.next_side)]
