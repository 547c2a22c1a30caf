"""ZB1P (ZB-H1 of "Zero Bubble Pipeline Parallelism"): 1F1B with the backward split in two.

Each backward becomes B (gradient for the input, which is what the previous stage waits for) and
W (gradient for the weights, which nobody waits for). Rank r keeps up to r W's pending and runs
them where 1F1B would idle in the cool-down; activations then peak at P per rank, as in 1F1B.
"""

from __future__ import annotations

from collections import deque

from .actions import Action, Op, Schedule, Step
from .schedule_1f1b import check_linear_args, linear_schedule


def zb1p(num_stages: int, num_microbatches: int) -> Schedule:
    check_linear_args("ZB1P", num_stages, num_microbatches, min_microbatches=num_stages)
    ranks = [_rank_steps(rank, num_stages, num_microbatches) for rank in range(num_stages)]
    return linear_schedule("ZB1P", num_stages, num_microbatches, ranks)


def _rank_steps(rank: int, num_stages: int, num_microbatches: int) -> list[Step]:
    steps: list[Step] = []
    owed: deque[int] = deque()  # micro-batches whose W is still to run, oldest first
    warmup = num_stages - 1 - rank

    def backward(m: int) -> None:
        steps.append(Action(Op.B, m, rank))
        owed.append(m)
        while len(owed) > rank:  # rank r may owe r W's
            steps.append(Action(Op.W, owed.popleft(), rank))

    # Warm-up: forwards only.
    steps += [Action(Op.F, m, rank) for m in range(warmup)]
    # Steady state: F, B, and a W once more than `rank` are owed.
    for m in range(num_microbatches - warmup):
        steps.append(Action(Op.F, warmup + m, rank))
        backward(m)
    # Cool-down: B (with W's as above), then the W's still owed fill the tail.
    for m in range(num_microbatches - warmup, num_microbatches):
        backward(m)
    steps += [Action(Op.W, m, rank) for m in owed]
    return steps
