"""A test transport with NCCL's worst-case point-to-point semantics, over gloo.

`install_rendezvous(deadline_s)` replaces torch.distributed.batch_isend_irecv in the calling process by
`RendezvousP2P`: a batch runs to completion before the call returns (as batches on one NCCL stream run
one after the other), and a send in it completes only once the peer has posted the matching receive
(NCCL above its buffer size). Messages between two ranks match by order, as in NCCL, not by tag: the
k-th send from a to b is the k-th receive of b from a, and a mismatch in tag, size or dtype raises.
gloo, by contrast, buffers sends and matches by tag, which hides both kinds of bug.

How: a receive first sends its peer a small "posted" token; a send waits for that token (at most
`deadline_s`, then it raises naming the message: a deadlock), then sends a description and the payload.
"""

from __future__ import annotations

import datetime
from collections import Counter

import torch
import torch.distributed as dist

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool)


class Deadlock(RuntimeError):
    pass


class _Done:
    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class RendezvousP2P:
    def __init__(self, deadline_s: float, isend=dist.isend, irecv=dist.irecv):
        self.deadline_s = deadline_s
        self._isend, self._irecv = isend, irecv  # gloo's own, not the patched batch call
        self.sent: Counter[int] = Counter()  # per peer (global rank): messages sent so far
        self.received: Counter[int] = Counter()
        self.batches = 0

    def __call__(self, ops: list[dist.P2POp]) -> list[_Done]:
        me = dist.get_rank()
        deadline = datetime.timedelta(seconds=self.deadline_s)
        pending = []
        for op in ops:  # every receive of the batch is posted first: tokens out, buffers ready
            if op.op is not self._irecv:
                continue
            k = self.received[op.peer]
            self.received[op.peer] += 1
            pending.append(self._isend(torch.tensor([k]), op.peer, op.group, tag=3 * k))
            meta = torch.zeros(3, dtype=torch.int64)
            pending.append(_Check(self._irecv(meta, op.peer, op.group, tag=3 * k + 1), meta, op, me, k))
            pending.append(self._irecv(op.tensor, op.peer, op.group, tag=3 * k + 2))
        for op in ops:  # a send goes once its receive is posted
            if op.op is self._irecv:
                continue
            k = self.sent[op.peer]
            self.sent[op.peer] += 1
            token = torch.zeros(1, dtype=torch.int64)
            try:
                self._irecv(token, op.peer, op.group, tag=3 * k).wait(deadline)
            except RuntimeError as err:
                raise Deadlock(
                    f"rank {me}: rendezvous send #{k} to rank {op.peer} (tag {op.tag}, shape "
                    f"{tuple(op.tensor.shape)}) waited {self.deadline_s:g} s for its receive to be posted "
                    f"(batch {self.batches} of this rank): the ranks deadlock under NCCL"
                ) from err
            meta = torch.tensor([op.tag, op.tensor.numel(), _DTYPES.index(op.tensor.dtype)])
            pending.append(self._isend(meta, op.peer, op.group, tag=3 * k + 1))
            pending.append(self._isend(op.tensor.contiguous(), op.peer, op.group, tag=3 * k + 2))
        for work in pending:
            work.wait(deadline)
        self.batches += 1
        return [_Done() for _ in ops]


class _Check:
    """Waits for a send's description and checks it is the receive's message (NCCL matches by order)."""

    def __init__(self, work, meta: torch.Tensor, op: dist.P2POp, me: int, k: int):
        self.work, self.meta, self.op, self.me, self.k = work, meta, op, me, k

    def wait(self, timeout) -> None:
        self.work.wait(timeout)
        tag, numel, dtype = self.meta.tolist()
        want = (self.op.tag, self.op.tensor.numel(), _DTYPES.index(self.op.tensor.dtype))
        if (tag, numel, dtype) != want:
            raise AssertionError(
                f"rank {self.me}: receive #{self.k} from rank {self.op.peer} expects (tag, numel, dtype) "
                f"{want} but the peer's send #{self.k} is {(tag, numel, dtype)}: under NCCL, which matches "
                "by order, this would deliver the wrong tensor"
            )


def install_rendezvous(deadline_s: float) -> RendezvousP2P:
    """Route every dist.batch_isend_irecv of this (spawned test) process through a RendezvousP2P."""
    transport = RendezvousP2P(deadline_s)
    dist.batch_isend_irecv = transport
    return transport
