"""Runs any schedule's action lists over torch.distributed point-to-point transfers.

    schedule = build_schedule("dualpipe", num_ranks=pp, num_microbatches=16)
    stages = {sid: build_stage(sid.stage) for sid in schedule.stages_of(rank)}
    executor = PipelineExecutor(schedule, stages, loss_fn)
    result = executor.step(inputs, targets)   # splits the batch, runs F/B/W/BW/F&B, fills .grad
    optimizer.step()
    losses = executor.step(inputs, targets, forward_only=True).losses   # evaluation: forwards only

A stage is any nn.Module taking one tensor and returning one tensor; the last stage's output goes
to `loss_fn(output, target)`, whose value is back-propagated as is (divide by the number of
micro-batches inside `loss_fn` for a mean). Ranks holding stage 0 need `inputs`, ranks holding the
last stage need `targets`; a tensor batch is split along dim 0 into the schedule's micro-batches,
or a sequence of micro-batches is used as given. Gradients accumulate into `.grad`; with DualPipe
the two copies of each stage are summed before `step` returns, so both copies hold the total
(added to what `.grad` held before the step; the copies must start with equal parameters), unless
`sum_copies=False`: the caller sums them itself (e.g. as two more holders in a ZeRO reduce-scatter).

An F&B pair calls `forward_backward(forward_job, backward_job)`: the constructor argument if given,
else the forward module's `overlapped_forward_backward` static/class method if its class has one,
else `sequential_forward_backward` (forward, then backward).

With `flight` (a moetron.comm.FlightRecorder) every transfer is recorded, and the collectives the stages
issue are labelled with the micro-batch of the action that issued them.

Received tensors are allocated on `device` (default: the device of the stages' parameters), so the
same code runs on CPU with gloo and on GPUs with NCCL.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from moetron.comm.recorder import FlightRecorder
from torch import nn
from torch.autograd.graph import get_gradient_edge

from .actions import FB, Action, Op, Schedule, StageId, actions_of
from .p2p import Message, StageComm
from .weight_grad import ChunkBackward, WeightGradStore

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ChunkKey = tuple[int, int, int]  # (micro-batch, stage, direction)


@dataclass
class ForwardJob:
    """The forward half of a step: run `module` on `input`, then `loss_fn` when `target` is given."""

    action: Action
    module: nn.Module
    input: torch.Tensor
    loss_fn: LossFn | None = None
    target: torch.Tensor | None = None

    def run(self) -> torch.Tensor:
        """The stage output, or the loss on the last stage."""
        out = self.module(self.input)
        return out if self.target is None else self.loss_fn(out, self.target)


@dataclass
class BackwardJob:
    """The backward half of a step: input and weight gradients in one pass, or only the input gradients
    when the action defers W to a W action (Op.B)."""

    action: Action
    module: nn.Module
    backward: ChunkBackward

    def run(self) -> list[torch.Tensor | None]:
        return self.backward.inputs_only() if self.action.op == Op.B else self.backward.full()

    def run_b_then_w(self) -> list[torch.Tensor | None]:
        """The same gradients, with the weight gradients computed last (B, then W, unless deferred): only B
        lies on the path to the next transfer (the previous stage, an all-to-all of gradients), so an
        overlapped pair issues its transfers sooner and the weight GEMMs run while they are in flight
        (arXiv 2412.19437 §3.2.1). It pays only where B can skip the weight GEMMs: autograd's own nodes can, and so
        can a custom Function that computes only the gradients the running backward asks for (moetron's FP8
        GEMMs do); one computing both at once would run twice."""
        grads = self.backward.inputs_only()
        if self.action.op != Op.B:
            self.backward.weights()
        return grads


def sequential_forward_backward(forward: ForwardJob, backward: BackwardJob) -> tuple[torch.Tensor, list]:
    """The default F&B: the forward, then the backward, nothing overlapped."""
    return forward.run(), backward.run()


@dataclass
class StepResult:
    losses: list[torch.Tensor | None]  # per micro-batch; None where the loss is on another rank
    peak_live_chunks: int  # most chunks (micro-batch x stage) whose activations were held at once


@dataclass
class _Chunk:
    input: torch.Tensor | None  # the stage input that needs a gradient, if any
    root: object | None  # gradient edge of the output (or the loss); None if nothing needs grad
    backward: ChunkBackward | None = None


class PipelineExecutor:
    def __init__(
        self,
        schedule: Schedule,
        stages: Mapping[StageId | int, nn.Module],
        loss_fn: LossFn | None = None,
        *,
        group: dist.ProcessGroup | None = None,
        forward_backward: Callable[[ForwardJob, BackwardJob], tuple] | None = None,
        device: torch.device | None = None,
        sum_copies: bool = True,
        flight: FlightRecorder | None = None,
    ):
        self.schedule = schedule
        self.sum_copies = sum_copies
        self.group = group
        self.rank = dist.get_rank(group)
        if dist.get_world_size(group) != schedule.num_ranks:
            raise ValueError(
                f"the process group has {dist.get_world_size(group)} ranks but schedule {schedule.name} "
                f"is built for num_ranks={schedule.num_ranks}; build the schedule with the group's size."
            )
        self.stages = self._match_stages(stages)
        self.loss_fn = loss_fn
        if loss_fn is None and any(sid.stage == schedule.num_stages - 1 for sid in self.stages):
            raise ValueError(
                f"loss_fn is required on rank {self.rank}: it holds the last stage "
                f"({schedule.num_stages - 1}), which computes the loss."
            )
        self._forward_backward = forward_backward
        params = [p for m in self.stages.values() for p in m.parameters()]
        self.device = device or (params[0].device if params else torch.get_default_device())
        self.flight = flight
        self.comm = StageComm(schedule, self.rank, group, self.device, flight)
        self.weight_grads = WeightGradStore()

    def _match_stages(self, stages: Mapping[StageId | int, nn.Module]) -> dict[StageId, nn.Module]:
        wanted = self.schedule.stages_of(self.rank)
        by_stage = {sid.stage: sid for sid in wanted}
        found = {}
        for key, module in stages.items():
            sid = key if isinstance(key, StageId) else by_stage.get(key)
            if sid not in wanted:
                break
            found[sid] = module
        if set(found) != set(wanted) or len(stages) != len(wanted):
            raise ValueError(
                f"stages on rank {self.rank} must be the stage copies {[tuple(s) for s in wanted]} "
                f"of schedule {self.schedule.name} (keys StageId(stage, direction), or the stage "
                f"number), got keys {list(stages)}."
            )
        return found

    # ---------------------------------------------------------------------------------- step
    def step(self, inputs=None, targets=None, *, forward_only: bool = False) -> StepResult:
        """Run one training step's forwards and backwards; gradients land in `.grad`.

        With `forward_only` (evaluation) only the forwards run (the forward half of an F&B pair too),
        in the schedule's order, under torch.no_grad(), with the same transfers; nothing is kept for a
        backward and `.grad` is left as it was. Every rank of the group must pass the same flag."""
        s = self.schedule
        self._inputs = self._split("inputs", inputs, any(sid.stage == 0 for sid in self.stages))
        self._targets = self._split("targets", targets, any(sid.stage == s.num_stages - 1 for sid in self.stages))
        self._chunks: dict[ChunkKey, _Chunk] = {}
        self._local: dict[Message, torch.Tensor] = {}  # transfers between two stages of this rank
        self._losses: list[torch.Tensor | None] = [None] * s.num_microbatches
        self._peak = 0
        if forward_only:
            return self._forward_only()
        sums = s.duplicated_stages and self.sum_copies
        earlier = self._take_grads() if sums else {}
        self.comm.begin_step(self._inputs)
        for index, step in enumerate(s.steps[self.rank]):
            self.comm.before(index)  # this step's receives, the last step's sends
            with self._micro_batch(step.forward if isinstance(step, FB) else step):
                if isinstance(step, FB):
                    self._pair(step)
                elif step.op == Op.F:
                    job = self._forward_job(step)
                    self._finish_forward(job, job.run())
                elif step.op == Op.W:
                    self.weight_grads.run(self._key(step))
                    del self._chunks[self._key(step)]
                else:
                    job = self._backward_job(step)
                    self._finish_backward(job, job.run())
            self.comm.poll()
        self.comm.finish()
        if self._chunks or len(self.weight_grads):
            raise RuntimeError(f"rank {self.rank}: chunks left after the step: {sorted(self._chunks)}")
        if sums:
            self._sum_copies()
            for p, g in earlier.items():
                p.grad = g + p.grad
        self._inputs = self._targets = None
        return StepResult(self._losses, self._peak)

    def _forward_only(self) -> StepResult:
        self.comm.begin_step(self._inputs, forward_only=True)
        forwards = [a for step in self.schedule.steps[self.rank] for a in actions_of(step) if a.op == Op.F]
        with torch.no_grad():
            for index, a in enumerate(forwards):  # an F&B pair holds one forward
                self.comm.before(index)
                with self._micro_batch(a):
                    job = self._forward_job(a)
                    self._hand_on(a, job.run())
                self.comm.poll()
            self.comm.finish()
        self._inputs = self._targets = None
        return StepResult(self._losses, 0)

    def _micro_batch(self, a: Action):
        """Label the collectives `a` issues (an F&B pair: its forward's) in the flight recorder."""
        return nullcontext() if self.flight is None else self.flight.context(micro_batch=a.microbatch)

    def _split(self, name: str, batch, needed: bool) -> Sequence[torch.Tensor] | None:
        n = self.schedule.num_microbatches
        if batch is None:
            if needed:
                raise ValueError(f"{name} is required on rank {self.rank}, which holds a "
                                 f"{'first' if name == 'inputs' else 'last'} stage.")
            return None
        if isinstance(batch, torch.Tensor):
            if batch.shape[0] < n:
                raise ValueError(f"{name} has {batch.shape[0]} rows along dim 0, fewer than the "
                                 f"{n} micro-batches of the schedule; give at least {n}.")
            return torch.tensor_split(batch, n, dim=0)
        if len(batch) != n:
            raise ValueError(f"{name} is a sequence of {len(batch)} micro-batches but the schedule "
                             f"has {n}; give exactly {n}, or one tensor to split along dim 0.")
        return list(batch)

    @staticmethod
    def _key(a: Action) -> ChunkKey:
        return (a.microbatch, a.stage, a.direction)

    # ------------------------------------------------------------------------------- forward
    def _forward_job(self, a: Action) -> ForwardJob:
        s = self.schedule
        if a.stage == 0:
            x = self._inputs[a.microbatch]
        else:
            msg = Message("act", a.microbatch, a.stage)
            src = s.rank_of(a.stage - 1, a.direction)
            x = self._local.pop(msg) if src == self.rank else self.comm.recv(msg, src)
            x = x.detach().requires_grad_(x.is_floating_point() and torch.is_grad_enabled())
        last = a.stage == s.num_stages - 1
        target = self._targets[a.microbatch] if last else None
        return ForwardJob(a, self.stages[a.stage_id], x, self.loss_fn if last else None, target)

    def _finish_forward(self, job: ForwardJob, out: torch.Tensor) -> None:
        """Record what the backward needs, then hand the output on (or keep the loss)."""
        a = job.action
        x = job.input if job.input.requires_grad else None
        self._chunks[self._key(a)] = _Chunk(x, get_gradient_edge(out) if out.requires_grad else None)
        self._peak = max(self._peak, len(self._chunks))
        self._hand_on(a, out)

    def _hand_on(self, a: Action, out: torch.Tensor) -> None:
        """Send a forward's output to the next stage, or keep it as the micro-batch's loss."""
        s = self.schedule
        if a.stage == s.num_stages - 1:
            self._losses[a.microbatch] = out.detach()
            return
        msg = Message("act", a.microbatch, a.stage + 1)
        dst = s.rank_of(a.stage + 1, a.direction)
        if dst == self.rank:
            self._local[msg] = out.detach()
        else:
            self.comm.send(msg, out, dst)  # `out` itself is not kept: the graph holds what it saved

    # ------------------------------------------------------------------------------ backward
    def _backward_job(self, a: Action) -> BackwardJob:
        s, chunk = self.schedule, self._chunks[self._key(a)]
        if a.stage == s.num_stages - 1:
            grad = None  # the loss: d loss / d loss = 1
        else:
            msg = Message("grad", a.microbatch, a.stage)
            src = s.rank_of(a.stage + 1, a.direction)
            grad = self._local.pop(msg) if src == self.rank else self.comm.recv(msg, src)
        inputs = [] if chunk.input is None else [chunk.input]
        if chunk.root is not None and grad is None:
            grad = torch.ones_like(self._losses[a.microbatch])
        chunk.backward = ChunkBackward(chunk.root, grad, inputs) if chunk.root is not None else None
        return BackwardJob(a, self.stages[a.stage_id], chunk.backward or _NoBackward())

    def _finish_backward(self, job: BackwardJob, grads: list[torch.Tensor | None]) -> None:
        s, a, key = self.schedule, job.action, self._key(job.action)
        chunk = self._chunks[key]
        if a.op == Op.B:
            self.weight_grads.put(key, chunk.backward or _NoBackward())
        else:
            del self._chunks[key]
        if a.stage == 0:
            return
        x = chunk.input
        grad = grads[0] if grads and grads[0] is not None else None
        if grad is None:
            if x is None:
                raise RuntimeError(
                    f"stage {a.stage} received a non-float or non-differentiable input, so no gradient "
                    "can flow to the previous stage"
                )
            grad = torch.zeros_like(x)
        msg = Message("grad", a.microbatch, a.stage - 1)
        dst = s.rank_of(a.stage - 1, a.direction)
        if dst == self.rank:
            self._local[msg] = grad
        else:
            self.comm.send(msg, grad, dst)

    # ---------------------------------------------------------------------------------- F&B
    def _pair(self, pair: FB) -> None:
        forward, backward = self._forward_job(pair.forward), self._backward_job(pair.backward)
        hook = self._forward_backward or getattr(
            type(forward.module), "overlapped_forward_backward", sequential_forward_backward
        )
        out, grads = hook(forward, backward)
        self._finish_forward(forward, out)
        self._finish_backward(backward, grads)

    # ------------------------------------------------------------------------- DualPipe copies
    def _take_grads(self) -> dict[torch.Tensor, torch.Tensor]:
        """Set aside gradients from earlier steps so only this step's copies are summed."""
        earlier = {}
        for module in self.stages.values():
            for p in module.parameters():
                if p.grad is not None:
                    earlier[p], p.grad = p.grad, None
        return earlier

    def _sum_copies(self) -> None:
        """Each stage held twice (DualPipe): both copies end with grad(direction 0) + grad(direction 1)."""
        s = self.schedule
        ops, exchanges = [], []
        for sid, module in sorted(self.stages.items()):
            for other, rank in sorted(s.placement.items()):
                if other.stage != sid.stage or other == sid:
                    continue
                params = list(module.parameters())
                mine = torch.cat([_grad_or_zeros(p).reshape(-1) for p in params]) if params else None
                if mine is None:
                    continue
                theirs = torch.empty_like(mine)
                peer = rank if self.group is None else dist.get_global_rank(self.group, rank)
                tag = 1 << 30 | sid.stage
                ops.append(dist.P2POp(dist.isend, mine, peer, self.group, tag))
                ops.append(dist.P2POp(dist.irecv, theirs, peer, self.group, tag))
                exchanges.append((params, mine, theirs, sid.direction < other.direction))
        if not ops:
            return
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        for params, mine, theirs, mine_first in exchanges:
            total = mine + theirs if mine_first else theirs + mine
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = total[offset : offset + n].view_as(p).clone()
                offset += n


class _NoBackward:
    """A chunk whose output needs no gradient (no parameters, no differentiable input)."""

    def full(self) -> list:
        return []

    def inputs_only(self) -> list:
        return []

    def weights(self) -> None:
        return None


def _grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)
