"""Runs a schedule's action lists against per-action costs and reports time, bubble and memory.

Every rank executes its steps in order; a step starts when its rank is free and everything it
needs is done (plus `p2p` latency when the producer is another rank). Costs follow arXiv 2412.19437 §3.2.1's
table: `b` is the FULL backward of a chunk, so a split B costs `b - w` and its W costs `w`; an
overlapped F&B pair costs `fb` (default `f + b`, i.e. no overlap).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .actions import FB, Action, Op, Schedule, ScheduleError, Step, actions_of
from .schedule_check import Key, produces, step_needs


@dataclass(frozen=True)
class Costs:
    f: float = 1.0
    b: float = 2.0
    w: float = 0.5
    fb: float | None = None
    p2p: float = 0.0

    def __post_init__(self) -> None:
        for name in ("f", "b", "w", "p2p"):
            if getattr(self, name) < 0:
                raise ScheduleError(f"cost {name} must be >= 0, got {getattr(self, name)}.")
        if self.w > self.b:
            raise ScheduleError(
                f"cost w ({self.w}) must not exceed b ({self.b}): b is the full backward, which "
                "includes the weight-gradient part w."
            )

    def of(self, step: Step) -> float:
        if isinstance(step, FB):
            return self.f + self.b if self.fb is None else self.fb
        return {Op.F: self.f, Op.B: self.b - self.w, Op.W: self.w, Op.BW: self.b}[step.op]


@dataclass(frozen=True)
class Span:
    """One step on the timeline."""

    rank: int
    step: Step
    start: float
    end: float


@dataclass
class SimResult:
    schedule: Schedule
    costs: Costs
    spans: list[Span] = field(default_factory=list)
    makespan: float = 0.0
    busy: list[float] = field(default_factory=list)  # per rank
    peak_activations: list[int] = field(default_factory=list)  # per rank, in chunk units

    @property
    def bubble(self) -> list[float]:
        """Idle time per rank: the step's length minus the time the rank computes."""
        return [self.makespan - b for b in self.busy]

    @property
    def max_bubble(self) -> float:
        return max(self.bubble)

    def report(self) -> str:
        s = self.schedule
        lines = [
            f"{s.name}: {s.num_ranks} ranks, {s.num_stages} stages, {s.num_microbatches} micro-batches; "
            f"costs f={self.costs.f} b={self.costs.b} w={self.costs.w} "
            f"fb={self.costs.of(FB(Action(Op.F, 0, 0), Action(Op.BW, 0, 0)))} p2p={self.costs.p2p}",
            f"step time {self.makespan:g}",
            "rank   busy   bubble  peak activations (chunks)",
        ]
        for r in range(s.num_ranks):
            lines.append(f"{r:>4} {self.busy[r]:>6g} {self.bubble[r]:>8g} {self.peak_activations[r]:>6}")
        lines.append(f"max bubble {self.max_bubble:g}, max peak activations {max(self.peak_activations)}")
        return "\n".join(lines)


def simulate(schedule: Schedule, costs: Costs | None = None) -> SimResult:
    costs = costs or Costs()
    result = SimResult(schedule, costs)
    finish: dict[Key, tuple[float, int]] = {}  # key -> (time it is done, rank that did it)
    position = [0] * schedule.num_ranks
    free_at = [0.0] * schedule.num_ranks
    progress = True
    while progress:
        progress = False
        for rank, steps in enumerate(schedule.steps):
            while position[rank] < len(steps):
                step = steps[position[rank]]
                needed = step_needs(schedule, step)
                if any(k not in finish for k in needed):
                    break
                ready = [t + (costs.p2p if r != rank else 0.0) for t, r in (finish[k] for k in needed)]
                start = max([free_at[rank], *ready])
                end = start + costs.of(step)
                for a in actions_of(step):
                    for k in produces(a):
                        finish[k] = (end, rank)
                result.spans.append(Span(rank, step, start, end))
                free_at[rank] = end
                position[rank] += 1
                progress = True
    stuck = [r for r, steps in enumerate(schedule.steps) if position[r] < len(steps)]
    if stuck:
        raise ScheduleError(f"{schedule.name} deadlocks on ranks {stuck}; run check_schedule for details.")
    result.spans.sort(key=lambda sp: (sp.rank, sp.start))
    result.makespan = max(free_at)
    result.busy = [sum(sp.end - sp.start for sp in result.spans if sp.rank == r) for r in range(schedule.num_ranks)]
    result.peak_activations = [peak_activations(steps) for steps in schedule.steps]
    return result


def peak_activations(steps: tuple[Step, ...]) -> int:
    """Most chunks alive at once on a rank: a chunk lives from its F until its backward is complete
    (its BW, or its W when the backward is split), because W still reads the saved activations."""
    live: set[tuple[int, int, int]] = set()
    peak = 0
    for step in steps:
        for a in actions_of(step):
            chunk = (a.microbatch, a.stage, a.direction)
            if a.op == Op.F:
                live.add(chunk)
                peak = max(peak, len(live))
            elif a.op in (Op.BW, Op.W):
                live.discard(chunk)
    return peak
