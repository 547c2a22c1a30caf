"""1F1B (PipeDream-flush): warm up with forwards, then alternate one forward and one backward."""

from __future__ import annotations

from .actions import Action, Op, Schedule, StageId, Step, require


def check_linear_args(name: str, num_stages: int, num_microbatches: int, min_microbatches: int) -> None:
    require(
        isinstance(num_stages, int) and num_stages >= 1,
        f"{name}: num_stages must be a positive integer (one stage per rank), got {num_stages!r}.",
    )
    require(
        isinstance(num_microbatches, int) and num_microbatches >= min_microbatches,
        f"{name}: num_microbatches must be an integer >= {min_microbatches} with {num_stages} "
        f"stages, got {num_microbatches!r}; use at least {min_microbatches} micro-batches "
        f"(2 x {num_stages} or more keeps the bubble share small).",
    )


def linear_schedule(name: str, num_stages: int, num_microbatches: int, steps) -> Schedule:
    return Schedule(
        name=name,
        num_ranks=num_stages,
        num_stages=num_stages,
        num_microbatches=num_microbatches,
        steps=tuple(tuple(s) for s in steps),
        placement={StageId(s, 0): s for s in range(num_stages)},
        directions=(0,) * num_microbatches,
    )


def one_f_one_b(num_stages: int, num_microbatches: int) -> Schedule:
    """Rank r holds stage r; per rank: P-1-r warm-up forwards, 1F1B steady state, cool-down.

    Any number of micro-batches works; fewer than `num_stages` leaves most ranks idle."""
    check_linear_args("1F1B", num_stages, num_microbatches, min_microbatches=1)
    ranks = [_rank_steps(rank, num_stages, num_microbatches) for rank in range(num_stages)]
    return linear_schedule("1F1B", num_stages, num_microbatches, ranks)


def _rank_steps(rank: int, num_stages: int, num_microbatches: int) -> list[Step]:
    warmup = min(num_stages - 1 - rank, num_microbatches)
    steps: list[Step] = []
    # Warm-up: forwards only, until the first gradient can come back.
    steps += [Action(Op.F, m, rank) for m in range(warmup)]
    # Steady state: one forward, one backward.
    for m in range(num_microbatches - warmup):
        steps += [Action(Op.F, warmup + m, rank), Action(Op.BW, m, rank)]
    # Cool-down: the remaining backwards.
    steps += [Action(Op.BW, m, rank) for m in range(num_microbatches - warmup, num_microbatches)]
    return steps
