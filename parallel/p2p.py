"""Stage-to-stage transfers for one executor: activations forward, gradients backward.

Before each of its steps a rank posts one `batch_isend_irecv` holding, with every peer, the sends of
the step before and the receives of this step (and, except on NCCL, the next step's receives where the
plan allows),
in the order `transfer_plan` fixes for each pair of ranks, which keeps every schedule free of deadlock
under NCCL, where a send completes only once its receive is posted. A receive is waited for only when
its data is needed; a send's tensor is held until its transfer completes.

Receives need shapes. A gradient has the shape of the activation this rank sent. An activation's
shape is learned once: the rank holding the first stage broadcasts the shapes and dtypes of the step's
input micro-batches (one small collective per step, waited for at the rank's first transfer); the first step with new input shapes sends a
header before each activation, later steps with the same input shapes reuse what it learned. So a
stage's output shape and dtype must depend only on its input's shape and dtype (checked on send).
Messages also carry unique tags, which gloo uses to match (NCCL matches by order). With a flight recorder
(moetron.comm.FlightRecorder) every transfer is recorded when posted and when it is known complete.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from moetron.comm.recorder import FlightRecorder

from .actions import Schedule, StageId
from .transfer_plan import Message, Post, plan_transfers

__all__ = ["Message", "StageComm"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool)
_MAX_DIMS = 8
_HEADER = 2 + _MAX_DIMS  # ndim, dtype, shape padded with zeros
_KEEP_SHAPES = 8  # input shapes whose activation shapes are remembered (training, evaluation, a last partial batch)

Shape = tuple[tuple[int, ...], torch.dtype]


class StageComm:
    """P2P for one pipeline rank. `group` is the pipeline process group (None: the default group)."""

    def __init__(self, schedule: Schedule, rank: int, group: dist.ProcessGroup | None, device: torch.device,
                 flight: FlightRecorder | None = None):
        self.schedule, self.rank, self.group, self.device, self.flight = schedule, rank, group, device, flight
        # Receives posted ahead let gloo move the next input during this step. A NCCL batch completes
        # as a whole (one work), so there a receive posted ahead would hold up the step before it.
        ahead = schedule.num_ranks == 1 or dist.get_backend(group) != "nccl"
        self._plan_of = {mode: plan_transfers(schedule, rank, mode, ahead) for mode in (False, True)}
        self._source = schedule.placement[StageId(0, 0)]  # holds every micro-batch's input
        self._learned: dict[tuple, dict[Message, Shape]] = {}  # input shapes -> activation shapes
        self._outbox: dict[Message, torch.Tensor] = {}
        self._posted: dict[Message, tuple[object, torch.Tensor, object]] = {}  # work, buffer, its Flight
        self._in_flight: list[tuple[object, torch.Tensor, object]] = []
        self._grad_like: dict[Message, Shape] = {}

    # ------------------------------------------------------------------------------ a step
    def begin_step(self, inputs, forward_only: bool = False) -> None:
        """Start a step: agree on the input shapes (a broadcast from the first stage's rank)."""
        self._plan = self._plan_of[forward_only]
        self._posted.clear()
        self._grad_like.clear()
        self._outbox.clear()  # left only by a step that raised
        self._key = self._input_key(inputs)

    def _agree(self) -> None:
        """Wait for the broadcast input shapes (once per step, at the first transfer): they say
        whether activation shapes are known or this step learns them."""
        if self._key is None:
            return
        work, table, flight = self._key
        if work is not None:
            self._wait(work, flight)
        key = tuple(map(tuple, table.tolist()))
        self._key = None
        self._learning = key not in self._learned
        if self._learning and len(self._learned) >= _KEEP_SHAPES:
            del self._learned[next(iter(self._learned))]  # the oldest input shapes (same on every rank)
        self._shapes = self._learned.setdefault(key, {})

    def before(self, index: int) -> None:
        """Post the batch planned before step `index` (step count: len(plan) - 1 means after the last)."""
        posts = self._plan[index]
        if not posts:
            return
        self._agree()
        if not self._learning:
            self._post(posts)
            return
        # Learning: an activation's receive waits for its header; the batch goes in pieces, each
        # ending at a header, which keeps the order shared with each peer.
        while posts:
            cut = next((k for k, p in enumerate(posts) if not p.send and p.msg.kind == "act"
                        and p.msg not in self._shapes), None)
            if cut is None:
                self._post(posts)
                return
            header = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
            self._post(posts[:cut], header=(posts[cut], header))
            self._shapes[posts[cut].msg] = self._parse(header)
            posts = posts[cut:]

    def finish(self) -> None:
        """Post the sends of the last step and wait for every transfer of the step."""
        self.before(len(self._plan) - 1)
        self._agree()  # a rank without transfers still completes the broadcast
        for work, _, flight in self._in_flight:
            self._wait(work, flight)
        self._in_flight = []
        if self._posted or self._outbox:
            raise RuntimeError(f"rank {self.rank}: transfers left after the step: "
                               f"{sorted(self._posted) + sorted(self._outbox)}")

    # --------------------------------------------------------------------------- transfers
    def send(self, msg: Message, tensor: torch.Tensor, dst: int) -> None:
        """Hand over `tensor`; it goes out with the next batch."""
        tensor = tensor.detach().contiguous()
        if msg.kind == "act":
            self._agree()
            self._check_shape(msg, tensor)
            self._grad_like[Message("grad", msg.microbatch, msg.stage - 1)] = (tuple(tensor.shape), tensor.dtype)
        self._outbox[msg] = tensor

    def recv(self, msg: Message, src: int) -> torch.Tensor:
        """Wait for `msg` (posted by an earlier `before`)."""
        if msg not in self._posted:
            raise RuntimeError(f"rank {self.rank}: {msg} from rank {src} was not posted (a bug in the plan)")
        work, buffer, flight = self._posted.pop(msg)
        self._wait(work, flight)
        return buffer

    def poll(self) -> None:
        """Release the tensors of finished sends."""
        pending = []
        for work, tensor, flight in self._in_flight:
            if work.is_completed():
                self._done(flight)
            else:
                pending.append((work, tensor, flight))
        self._in_flight = pending

    def _issue(self, send: bool, msg: Message, tensor: torch.Tensor, peer: int, header: bool = False):
        if self.flight is None:
            return None
        return self.flight.issue("send" if send else "recv", self.group, peer=peer, micro_batch=msg.microbatch,
                                 what=f"{msg.kind}{' header' if header else ''} stage {msg.stage}",
                                 nbytes=tensor.numel() * tensor.element_size())

    def _wait(self, work, flight) -> None:
        if flight is not None:
            self.flight.wait(flight)
        work.wait()
        self._done(flight)

    def _done(self, flight) -> None:
        if flight is not None:
            self.flight.done(flight)

    def _post(self, posts: list[Post], header: tuple[Post, torch.Tensor] | None = None) -> None:
        ops, kept = [], []
        for post in posts:
            peer = self._peer(post.peer)
            if post.send:
                tensor = self._outbox.pop(post.msg)
                if self._learning and post.msg.kind == "act":
                    ops.append(dist.P2POp(dist.isend, self._header(tensor), peer, self.group, self._tag(post.msg, True)))
                    kept.append((None, ops[-1].tensor, self._issue(True, post.msg, ops[-1].tensor, peer, True)))
                ops.append(dist.P2POp(dist.isend, tensor, peer, self.group, self._tag(post.msg, False)))
                kept.append((None, tensor, self._issue(True, post.msg, tensor, peer)))
            else:
                if post.msg.kind == "act":
                    shape, dtype = self._shapes[post.msg]
                else:
                    shape, dtype = self._grad_like.pop(post.msg)
                buffer = torch.empty(shape, dtype=dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, buffer, peer, self.group, self._tag(post.msg, False)))
                kept.append((post.msg, buffer, self._issue(False, post.msg, buffer, peer)))
        header_flight = None
        if header is not None:
            post, buffer = header
            ops.append(dist.P2POp(dist.irecv, buffer, self._peer(post.peer), self.group, self._tag(post.msg, True)))
            header_flight = self._issue(False, post.msg, buffer, self._peer(post.peer), True)
        if not ops:
            return
        works = dist.batch_isend_irecv(ops)
        if len(works) != len(ops):  # NCCL: one work for the whole (coalesced) batch
            works = [works[-1]] * len(ops)
        for work, (msg, tensor, flight) in zip(works, kept):
            if msg is None:
                self._in_flight.append((work, tensor, flight))
            else:
                self._posted[msg] = (work, tensor, flight)
        if header is not None:
            self._wait(works[-1], header_flight)

    # ------------------------------------------------------------------------------ shapes
    def _input_key(self, inputs) -> tuple:
        """Start broadcasting the step's input shapes and dtypes from the source (the same on every
        rank once it arrives); `_agree` waits for them."""
        n = self.schedule.num_microbatches
        table = torch.zeros(n, _HEADER, dtype=torch.int64, device=self.device)
        if self.rank == self._source:
            for m, x in enumerate(inputs):
                table[m] = self._header(x)
        if self.schedule.num_ranks == 1:
            return None, table, None
        flight = None if self.flight is None else self.flight.issue(
            "broadcast", self.group, what="input shapes", nbytes=table.numel() * table.element_size())
        return dist.broadcast(table, self._peer(self._source), group=self.group, async_op=True), table, flight

    def _check_shape(self, msg: Message, tensor: torch.Tensor) -> None:
        got = (tuple(tensor.shape), tensor.dtype)
        if self._learning:
            self._shapes.setdefault(msg, got)
        elif self._shapes.get(msg, got) != got:
            want = self._shapes[msg]
            raise RuntimeError(
                f"stage {msg.stage - 1} gave micro-batch {msg.microbatch} an output of shape {got[0]} and "
                f"{got[1]}, but {want[0]} and {want[1]} in an earlier step with the same input shapes: the "
                "pipeline learns activation shapes once per input shape, so a stage's output shape must "
                "depend only on its input's shape."
            )

    def _peer(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _tag(self, msg: Message, header: bool) -> int:
        index = msg.microbatch * self.schedule.num_stages + msg.stage
        return (index * 2 + (msg.kind == "grad")) * 2 + header

    def _header(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() > _MAX_DIMS or tensor.dtype not in _DTYPES:
            raise ValueError(
                f"a stage's input and output must be tensors of at most {_MAX_DIMS} dims with dtype in "
                f"{[str(d) for d in _DTYPES]}, got shape {tuple(tensor.shape)} and {tensor.dtype}"
            )
        values = [tensor.dim(), _DTYPES.index(tensor.dtype), *tensor.shape]
        values += [0] * (_HEADER - len(values))
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    @staticmethod
    def _parse(header: torch.Tensor) -> Shape:
        values = header.tolist()
        ndim, dtype = values[0], _DTYPES[values[1]]
        return tuple(values[2 : 2 + ndim]), dtype
