"""Runs any schedule's action lists over torch.distributed point-to-point transfers.

    schedule = build_schedule("dualpipe", num_ranks=pp, num_microbatches=16)
    stages = {sid: build_stage(sid.stage) for sid in schedule.stages_of(rank)}
    executor = PipelineExecutor(schedule, stages, loss_fn)
    result = executor.step(inputs, targets)   # splits the batch, runs F/B/W/BW/F&B, fills .grad
    optimizer.step()

A stage is any nn.Module taking one tensor and returning one tensor; the last stage's output goes
to `loss_fn(output, target)`, whose value is back-propagated as is (divide by the number of
micro-batches inside `loss_fn` for a mean). Ranks holding stage 0 need `inputs`, ranks holding the
last stage need `targets`; a tensor batch is split along dim 0 into the schedule's micro-batches,
or a sequence of micro-batches is used as given. Gradients accumulate into `.grad`; with DualPipe
the two copies of each stage are summed before `step` returns, so both copies hold the total
(they must start the step with equal parameters and zero or None gradients).

An F&B pair calls `forward_backward(forward_job, backward_job)`: the constructor argument if given,
else the forward module's `overlapped_forward_backward` static/class method if its class has one,
else `sequential_forward_backward` (forward, then backward).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
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
    """The backward half of a step: `backward.full()` computes weight and input gradients."""

    action: Action
    module: nn.Module
    backward: ChunkBackward

    def run(self) -> list[torch.Tensor | None]:
        return self.backward.full()


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
    ):
        self.schedule = schedule
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
        self.device = params[0].device if params else torch.device("cpu")
        self.comm = StageComm(schedule, self.rank, group, self.device)
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
    def step(self, inputs=None, targets=None) -> StepResult:
        """Run one training step's forwards and backwards; gradients land in `.grad`."""
        s = self.schedule
        mine = self.stages
        self._inputs = self._split("inputs", inputs, any(sid.stage == 0 for sid in mine))
        self._targets = self._split("targets", targets, any(sid.stage == s.num_stages - 1 for sid in mine))
        self._chunks: dict[ChunkKey, _Chunk] = {}
        self._local: dict[Message, torch.Tensor] = {}  # transfers between two stages of this rank
        self._losses: list[torch.Tensor | None] = [None] * s.num_microbatches
        self._peak = 0
        for step in s.steps[self.rank]:
            if isinstance(step, FB):
                self._pair(step)
            elif step.op == Op.F:
                self._finish_forward(step, self._forward_job(step).run())
            elif step.op == Op.BW:
                job = self._backward_job(step)
                self._finish_backward(step, job.backward.full())
            elif step.op == Op.B:
                job = self._backward_job(step)
                self._finish_backward(step, job.backward.inputs_only())
            else:
                self.weight_grads.run(self._key(step))
                del self._chunks[self._key(step)]
            self.comm.poll()
        self.comm.flush()
        if self._chunks or len(self.weight_grads):
            raise RuntimeError(f"rank {self.rank}: chunks left after the step: {sorted(self._chunks)}")
        if s.duplicated_stages:
            self._sum_copies()
        return StepResult(self._losses, self._peak)

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
            x = x.detach().requires_grad_(x.is_floating_point())
        last = a.stage == s.num_stages - 1
        target = self._targets[a.microbatch] if last else None
        return ForwardJob(a, self.stages[a.stage_id], x, self.loss_fn if last else None, target)

    def _finish_forward(self, a: Action, out: torch.Tensor) -> None:
        s, key = self.schedule, self._key(a)
        job_input = self._pending_input
        root = get_gradient_edge(out) if out.requires_grad else None
        self._chunks[key] = _Chunk(job_input if job_input is not None and job_input.requires_grad else None, root)
        self._peak = max(self._peak, len(self._chunks))
        if a.stage == s.num_stages - 1:
            self._losses[a.microbatch] = out.detach()
            return
        msg = Message("act", a.microbatch, a.stage + 1)
        dst = s.rank_of(a.stage + 1, a.direction)
        if dst == self.rank:
            self._local[msg] = out.detach()
        else:
            self.comm.send(msg, out, dst)
