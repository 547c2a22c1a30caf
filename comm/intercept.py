"""One place where every collective of moetron.comm passes (the row all-to-alls and the count exchanges of
dispatch and combine, both directions, forward and backward), so that three things can be switched on
without touching the dispatcher:

- a link model (comm/link_model.py): handles complete no earlier than the modelled transfer time;
- twin process groups for overlap (comm/overlap.py): while a forward and a backward chunk run at once,
  the backward side's collectives go to a twin of each group, so the two chunks never have to issue their
  collectives in one agreed order;
- a recorder of when each collective was issued and waited for (the timeline of benchmarks/overlap.py).

`install()` (idempotent; called by use_link_model and the overlap entry points) routes the module-level
transport functions of comm.transport and comm.dispatch through the wrappers below; with nothing switched
on they call the originals unchanged.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import dispatch as _dispatch
from . import transport as _transport
from .link_model import LinkModel


@dataclass
class Span:
    rank: int
    role: str  # "F" (forward chunk), "B" (backward chunk) or "-" (not inside an F&B pair)
    kind: str  # "comm": issue -> data usable; "wait": the thread blocked on it
    start: float
    end: float
    what: str = ""  # counts, dispatch, combine, combine-bwd (a dispatch of gradients), dispatch-bwd


@dataclass
class Recorder:
    """Collects Spans (time.perf_counter seconds) of every collective; thread-safe."""

    spans: list[Span] = field(default_factory=list)
    marks: list[tuple[int, str, str, float]] = field(default_factory=list)  # (rank, role, label, time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, span: Span) -> None:
        with self._lock:
            self.spans.append(span)

    def mark(self, label: str) -> None:
        with self._lock:
            self.marks.append((_rank(), role(), label, time.perf_counter()))


@dataclass
class _State:
    link: LinkModel | None = None
    recorder: Recorder | None = None
    twins: dict = field(default_factory=dict)  # group -> twin group
    forward_thread: int | None = None  # set while an overlapped F&B pair runs
    token: ComputeToken | None = None  # who may compute, while an overlapped F&B pair runs
    originals: dict = field(default_factory=dict)


class ComputeToken:
    """Only its holder ("F" or "B") computes. A side gives it up whenever it waits for a collective and takes
    it back at its next compute step, so one side's transfer is in flight while the other computes, and the
    two never slice the cores between them. Nobody blocks on a collective while holding it, so it cannot
    deadlock across ranks; the glue between the hops of one dispatch runs without it (issued promptly)."""

    def __init__(self):
        self._cv = threading.Condition()
        self.owner: str | None = None

    def acquire(self, who: str) -> None:
        with self._cv:
            if self.owner in (None, who):
                self.owner = who
                return
            start = time.perf_counter()
            while self.owner not in (None, who):
                self._cv.wait()
            self.owner = who
        rec = STATE.recorder
        if rec is not None:
            rec.add(Span(_rank(), who, "token", start, time.perf_counter()))

    def release(self, who: str) -> None:
        with self._cv:
            if self.owner == who:
                self.owner = None
                self._cv.notify_all()


STATE = _State()
_install_lock = threading.Lock()


def role() -> str:
    """Which side of a running F&B pair the calling thread works for."""
    if STATE.forward_thread is None:
        return "-"
    return "F" if threading.get_ident() == STATE.forward_thread else "B"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _route(group):
    """The group the calling thread must use: the twin for the backward side of a running pair."""
    if group is None or role() != "B":
        return group
    twin = STATE.twins.get(group)
    if twin is None:
        raise RuntimeError(
            "an overlapped F&B pair's backward chunk issued a collective on a process group without a twin; "
            "create twins once at setup (collective) with moetron.comm.overlap.enable_overlap(ep, partition, "
            "ranks_per_node) or register_twin(group, twin)")
    return twin


_CALLERS = {"dispatch_async": "dispatch", "finish": "dispatch", "forward_bytes": "combine-bwd",
            "make_hop": "counts"}


def _what() -> str:
    """Which step of dispatch / combine issued the collective (for timelines only)."""
    if STATE.recorder is None:
        return ""
    frame = sys._getframe(2)
    for _ in range(3):
        if frame is None:
            break
        name = frame.f_code.co_name
        if name == "send":  # Route.reverse: a combine, or the backward of a dispatch
            return "dispatch-bwd" if frame.f_locals.get("kind") == "backward" else "combine"
        if name in _CALLERS:
            return _CALLERS[name]
        frame = frame.f_back
    return "other"


class _Handle:
    """The real work, optionally delayed by the link model, with its wait recorded."""

    def __init__(self, work, issued: float, deadline: float | None, what: str = ""):
        self.work, self.issued, self.deadline, self.role, self.what = work, issued, deadline, role(), what

    def wait(self) -> bool:
        token = STATE.token
        if token is not None:
            token.release(role())
        t0 = time.perf_counter()
        link = STATE.link
        if self.deadline is not None and link is not None:
            link.delay(self.work, self.deadline).wait()
        elif self.work is not None:
            self.work.wait()
        t1 = time.perf_counter()
        rec = STATE.recorder
        if rec is not None:
            rec.add(Span(_rank(), self.role, "comm", self.issued, t1, self.what))
            rec.add(Span(_rank(), self.role, "wait", t0, t1, self.what))
        return True

    def is_completed(self) -> bool:
        return self.work is None or self.work.is_completed()


def _book(group, send_splits: list[int], recv_splits: list[int], row_bytes: int) -> float | None:
    link = STATE.link
    if link is None:
        return None
    peers = dist.get_process_group_ranks(group)
    me = peers.index(dist.get_rank())
    intra, inter = link.peer_bytes(peers, me, send_splits, recv_splits, row_bytes)
    return link.issue(intra, inter)


def all_to_all(buf: torch.Tensor, group, send_splits: list[int], recv_splits: list[int], async_op: bool = False):
    """comm.transport.all_to_all, routed, timed and recorded."""
    original = STATE.originals["all_to_all"]
    if group is None:
        return original(buf, group, send_splits, recv_splits, async_op)
    group = _route(group)
    issued = time.perf_counter()
    row_bytes = buf[:1].numel() * buf.element_size() if buf.dim() else buf.element_size()
    deadline = _book(group, send_splits, recv_splits, row_bytes)
    out, work = original(buf, group, send_splits, recv_splits, True)
    handle = _Handle(work, issued, deadline, _what())
    if async_op:
        return out, handle
    handle.wait()
    return out, None


def exchange_counts(group, size: int, send_splits: list[int], device="cpu") -> list[int]:
    """comm.transport.exchange_counts (one int64 per peer), routed, timed and recorded."""
    if group is None:
        return list(send_splits)
    group = _route(group)
    issued = time.perf_counter()
    deadline = _book(group, [1] * size, [1] * size, 8)
    send = torch.tensor(send_splits, dtype=torch.int64, device=device)
    recv = torch.empty(size, dtype=torch.int64, device=device)
    _Handle(dist.all_to_all_single(recv, send, group=group, async_op=True), issued, deadline, "counts").wait()
    return recv.tolist()


def install() -> None:
    """Route comm's transport functions through the wrappers (idempotent)."""
    with _install_lock:
        if STATE.originals:
            return
        STATE.originals["all_to_all"] = _transport.all_to_all
        STATE.originals["exchange_counts"] = _transport.exchange_counts
        _transport.all_to_all = all_to_all
        _dispatch.all_to_all = all_to_all
        _transport.exchange_counts = exchange_counts


def set_link_model(model: LinkModel | None) -> None:
    """Time every collective of moetron.comm by `model` from now on (None: real transport speed)."""
    install()
    STATE.link = model


@contextlib.contextmanager
def use_link_model(model: LinkModel | None):
    previous = STATE.link
    set_link_model(model)
    try:
        yield model
    finally:
        STATE.link = previous


@contextlib.contextmanager
def recording(recorder: Recorder | None = None):
    """Record the spans of every collective inside the block into `recorder` (a new one if omitted)."""
    install()
    recorder = recorder if recorder is not None else Recorder()
    previous, STATE.recorder = STATE.recorder, recorder
    try:
        yield recorder
    finally:
        STATE.recorder = previous
