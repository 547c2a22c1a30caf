"""Checks that a schedule is complete and can run: `check_schedule(schedule)` raises if not.

Complete: every micro-batch goes forward through every stage of its direction exactly once, on the
rank that holds that stage copy, and backward exactly once (a full BW, or a B and a later W on the
same rank). Runnable: walking all ranks' lists in order while honouring the data dependencies
(a forward needs the previous stage's forward, a backward needs its own forward and the next
stage's backward, a W its B) reaches the end of every list - no rank waits forever.
"""

from __future__ import annotations

from collections import Counter

from .actions import FB, Action, Op, Schedule, ScheduleError, Step, actions_of

# A dependency key: ("F" | "B" | "W", micro-batch, stage). "B" is done by either B or BW and means
# the input gradient exists; "W" is done by W or BW and means the weight gradient exists.
Key = tuple[str, int, int]


def produces(action: Action) -> tuple[Key, ...]:
    m, s = action.microbatch, action.stage
    return {
        Op.F: (("F", m, s),),
        Op.B: (("B", m, s),),
        Op.W: (("W", m, s),),
        Op.BW: (("B", m, s), ("W", m, s)),
    }[action.op]


def needs(schedule: Schedule, action: Action) -> tuple[Key, ...]:
    """What must be done before `action` can start (on any rank)."""
    m, s = action.microbatch, action.stage
    if action.op == Op.F:
        return () if s == 0 else (("F", m, s - 1),)
    if action.op in (Op.B, Op.BW):
        own = (("F", m, s),)
        return own if s == schedule.num_stages - 1 else own + (("B", m, s + 1),)
    return (("B", m, s),)  # W


def step_needs(schedule: Schedule, step: Step) -> tuple[Key, ...]:
    return tuple(k for a in actions_of(step) for k in needs(schedule, a))


def check_schedule(schedule: Schedule) -> None:
    """Raise ScheduleError naming the first problem found; return None if the schedule is sound."""
    _check_complete(schedule)
    _check_runnable(schedule)


def _check_complete(schedule: Schedule) -> None:
    counts: Counter[Key] = Counter()
    for rank, steps in enumerate(schedule.steps):
        for step in steps:
            if isinstance(step, FB):
                _require(step.forward.op == Op.F and step.backward.op == Op.BW,
                         f"rank {rank}: a pair must be a forward and a full backward, got {step}")
                _require(not set(produces(step.forward)) & set(needs(schedule, step.backward)),
                         f"rank {rank}: in {step} the backward waits for its own pair's forward")
            for a in actions_of(step):
                direction = schedule.directions[a.microbatch]
                _require(a.direction == direction,
                         f"rank {rank}: {a} has direction {a.direction}, micro-batch {a.microbatch} "
                         f"travels in direction {direction}")
                owner = schedule.placement.get(a.stage_id)
                _require(owner == rank, f"rank {rank}: {a} runs on a stage copy held by rank {owner}")
                counts.update(produces(a))
    for m in range(schedule.num_microbatches):
        for s in range(schedule.num_stages):
            for kind in "FBW":
                n = counts[(kind, m, s)]
                _require(n == 1, f"{kind} of micro-batch {m} on stage {s} appears {n} times, not once")


def _check_runnable(schedule: Schedule) -> None:
    done: set[Key] = set()
    position = [0] * schedule.num_ranks
    progress = True
    while progress:
        progress = False
        for rank, steps in enumerate(schedule.steps):
            while position[rank] < len(steps):
                step = steps[position[rank]]
                if not set(step_needs(schedule, step)) <= done:
                    break
                for a in actions_of(step):
                    done.update(produces(a))
                position[rank] += 1
                progress = True
    stuck = [f"rank {r} at {steps[position[r]]}" for r, steps in enumerate(schedule.steps)
             if position[r] < len(steps)]
    _require(not stuck, f"{schedule.name} deadlocks: " + ", ".join(stuck))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ScheduleError(message)
