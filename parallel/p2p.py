"""Stage-to-stage transfers for one executor: activations forward, gradients backward.

Sends are asynchronous (`batch_isend_irecv`) and their tensors are held only until the transfer
completes, then released. A receive is posted when the data is needed; receives from one peer are
posted in the order that peer sends (every rank knows every rank's action list), which is what
NCCL requires, and each message also carries a unique tag, which gloo uses to match.

An activation travels as a small header (rank, dtype, shape) and its payload, because a stage may
change shapes; a gradient has the shape of the activation this rank sent, so it needs no header.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import torch
import torch.distributed as dist

from .actions import Op, Schedule, actions_of

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool)
_MAX_DIMS = 8


class Message(NamedTuple):
    kind: str  # "act" (to the next stage) or "grad" (to the previous stage)
    microbatch: int
    stage: int  # the stage that receives it


def outgoing(schedule: Schedule, rank: int) -> list[tuple[Message, int]]:
    """(message, destination rank) for everything `rank` sends to other ranks, in send order."""
    sent = []
    for step in schedule.steps[rank]:
        for a in actions_of(step):
            d = a.direction
            if a.op == Op.F and a.stage < schedule.num_stages - 1:
                msg, dst = Message("act", a.microbatch, a.stage + 1), schedule.rank_of(a.stage + 1, d)
            elif a.op in (Op.B, Op.BW) and a.stage > 0:
                msg, dst = Message("grad", a.microbatch, a.stage - 1), schedule.rank_of(a.stage - 1, d)
            else:
                continue
            if dst != rank:
                sent.append((msg, dst))
    return sent


class StageComm:
    """P2P for one pipeline rank. `group` is the pipeline process group (None: the default group)."""

    def __init__(self, schedule: Schedule, rank: int, group: dist.ProcessGroup | None, device: torch.device):
        self.schedule, self.rank, self.group, self.device = schedule, rank, group, device
        self._expected = {  # per peer, what it sends this rank in one step, in its order
            peer: [m for m, dst in outgoing(schedule, peer) if dst == rank]
            for peer in range(schedule.num_ranks) if peer != rank
        }
        self._incoming: dict[int, deque[Message]] = {}
        self._posted: dict[Message, tuple[list, torch.Tensor]] = {}
        self._in_flight: list[tuple[list, list[torch.Tensor]]] = []
        self._grad_like: dict[Message, tuple[torch.Size, torch.dtype]] = {}

    def begin_step(self, forward_only: bool = False) -> None:
        """Expect every peer's messages of a new step (only the activations with `forward_only`)."""
        self._incoming = {peer: deque(m for m in msgs if not forward_only or m.kind == "act")
                          for peer, msgs in self._expected.items()}
        self._posted.clear()
        self._grad_like.clear()

    def _peer(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _tag(self, msg: Message, header: bool) -> int:
        index = msg.microbatch * self.schedule.num_stages + msg.stage
        return (index * 2 + (msg.kind == "grad")) * 2 + header

    def send(self, msg: Message, tensor: torch.Tensor, dst: int) -> None:
        """Start sending `tensor`; the reference is dropped once the transfer completes."""
        tensor = tensor.detach().contiguous()
        peer = self._peer(dst)
        ops, held = [], [tensor]
        if msg.kind == "act":
            header = self._header(tensor)
            ops.append(dist.P2POp(dist.isend, header, peer, self.group, self._tag(msg, True)))
            held.append(header)
            self._grad_like[Message("grad", msg.microbatch, msg.stage - 1)] = (tensor.shape, tensor.dtype)
        ops.append(dist.P2POp(dist.isend, tensor, peer, self.group, self._tag(msg, False)))
        self._in_flight.append((dist.batch_isend_irecv(ops), held))

    def recv(self, msg: Message, src: int) -> torch.Tensor:
        """Wait for `msg` from `src`, posting the receives of that peer's earlier messages first."""
        queue = self._incoming[src]
        while msg not in self._posted:
            if not queue:
                raise RuntimeError(f"rank {self.rank} waits for {msg} that rank {src} never sends")
            self._post(queue.popleft(), src)
        works, buffer = self._posted.pop(msg)
        for w in works:
            w.wait()
        return buffer

    def _post(self, msg: Message, src: int) -> None:
        peer = self._peer(src)
        if msg.kind == "act":
            header = torch.empty(2 + _MAX_DIMS, dtype=torch.int64, device=self.device)
            for w in dist.batch_isend_irecv([dist.P2POp(dist.irecv, header, peer, self.group, self._tag(msg, True))]):
                w.wait()
            shape, dtype = self._parse(header)
        else:
            shape, dtype = self._grad_like.pop(msg)
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        works = dist.batch_isend_irecv([dist.P2POp(dist.irecv, buffer, peer, self.group, self._tag(msg, False))])
        self._posted[msg] = (works, buffer)

    def poll(self) -> None:
        """Release the tensors of finished sends."""
        self._in_flight = [(ws, held) for ws, held in self._in_flight if not all(w.is_completed() for w in ws)]

    def flush(self) -> None:
        """Wait for every send to finish."""
        for works, _ in self._in_flight:
            for w in works:
                w.wait()
        self._in_flight = []

    def _header(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() > _MAX_DIMS or tensor.dtype not in _DTYPES:
            raise ValueError(
                f"a stage output must be a tensor of at most {_MAX_DIMS} dims with dtype in "
                f"{[str(d) for d in _DTYPES]}, got shape {tuple(tensor.shape)} and {tensor.dtype}"
            )
        values = [tensor.dim(), _DTYPES.index(tensor.dtype), *tensor.shape]
        values += [0] * (2 + _MAX_DIMS - len(values))
        return torch.tensor(values, dtype=torch.int64, device=tensor.device)

    @staticmethod
    def _parse(header: torch.Tensor) -> tuple[list[int], torch.dtype]:
        values = header.tolist()
        ndim, dtype = values[0], _DTYPES[values[1]]
        return values[2 : 2 + ndim], dtype
