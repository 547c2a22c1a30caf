"""Pipeline schedules as data: actions, the per-rank action lists and where each stage lives.

A schedule is a plain value. Every rank runs its own ordered list of steps; a step is either a
single `Action` (forward F, backward-for-input B, backward-for-weights W, or the full backward BW)
or an `FB` pair (the forward of one chunk and the full backward of another, which a stage may
overlap). A "chunk" is one micro-batch through one stage copy; a stage copy is a `StageId`:
the stage index plus the direction its micro-batches travel (DualPipe holds every stage twice, one
copy per direction; the other schedules use direction 0, DualPipeV uses 0 on the way down and 1 on
the way back up).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple


class ScheduleError(ValueError):
    """A schedule was asked for with parameters it cannot be built for."""


class Op(str, Enum):
    F = "F"  # forward
    B = "B"  # backward for the input only; the weight gradient is deferred to a later W
    W = "W"  # the deferred weight gradient of an earlier B
    BW = "BW"  # full backward: input and weight gradients at once

    def __str__(self) -> str:
        return self.value


class StageId(NamedTuple):
    """One copy of one pipeline stage: the stage index and the direction its micro-batches go."""

    stage: int
    direction: int = 0


@dataclass(frozen=True)
class Action:
    op: Op
    microbatch: int
    stage: int
    direction: int = 0

    @property
    def stage_id(self) -> StageId:
        return StageId(self.stage, self.direction)

    def __str__(self) -> str:
        arrow = "" if self.direction == 0 else "'"
        return f"{self.op}{self.microbatch}{arrow}@{self.stage}"


@dataclass(frozen=True)
class FB:
    """A forward chunk and the full backward (BW) of another chunk, run as one overlappable pair."""

    forward: Action
    backward: Action

    def __str__(self) -> str:
        return f"({self.forward}&{self.backward})"


Step = Action | FB


def actions_of(step: Step) -> tuple[Action, ...]:
    """The single actions inside a step, in the order a plain (non-overlapped) run does them."""
    return (step.forward, step.backward) if isinstance(step, FB) else (step,)


@dataclass(frozen=True)
class Schedule:
    """Per-rank ordered steps plus the placement every rank needs to know where data goes.

    `placement` maps each stage copy to the rank that holds it; `directions[m]` is the direction
    micro-batch m travels. Stage s feeds stage s+1 of the same direction; the last stage
    (`num_stages - 1`) computes the loss.
    """

    name: str
    num_ranks: int
    num_stages: int
    num_microbatches: int
    steps: tuple[tuple[Step, ...], ...]
    placement: dict[StageId, int] = field(compare=False)
    directions: tuple[int, ...]

    def rank_of(self, stage: int, direction: int) -> int:
        return self.placement[StageId(stage, direction)]

    def stages_of(self, rank: int) -> list[StageId]:
        """The stage copies that live on `rank`, sorted."""
        return sorted(sid for sid, r in self.placement.items() if r == rank)

    @property
    def duplicated_stages(self) -> bool:
        """True when some stage exists twice (DualPipe); their gradients must be summed."""
        return len({sid.stage for sid in self.placement}) < len(self.placement)

    @property
    def splits_backward(self) -> bool:
        """True when some backward is split into B and a later W."""
        return any(a.op == Op.W for steps in self.steps for s in steps for a in actions_of(s))

    def format(self) -> str:
        """One line per rank, like the published figures: `F3@1` is micro-batch 3 on stage 1,
        a prime marks direction 1, `(F&BW)` is an overlapped pair."""
        lines = [
            f"{self.name}: {self.num_ranks} ranks, {self.num_stages} stages, "
            f"{self.num_microbatches} micro-batches"
        ]
        for rank, steps in enumerate(self.steps):
            lines.append(f"rank {rank}: " + " ".join(str(s) for s in steps))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def require(condition: bool, message: str) -> None:
    """Raise a ScheduleError with a one-paragraph message unless `condition` holds."""
    if not condition:
        raise ScheduleError(message)
