"""Pipeline schedules as data: completeness, dependencies, placement and clear errors."""

from __future__ import annotations

from collections import Counter

import pytest
from moetron.parallel import (
    FB,
    Action,
    Op,
    Schedule,
    ScheduleError,
    StageId,
    actions_of,
    build_schedule,
    check_schedule,
)

CASES = [
    (name, ranks, chunks)
    for name, rank_counts in [("1f1b", (1, 2, 3, 4, 8)), ("zb1p", (1, 2, 3, 4, 8)),
                              ("dualpipe", (2, 4, 6, 8, 16)), ("dualpipev", (1, 2, 3, 4, 8))]
    for ranks in rank_counts
    for chunks in (2 * ranks, 2 * ranks + 2, 5 * ranks)
]


def walk(schedule: Schedule) -> list[Action]:
    """An independent dependency walk: run every rank's list in order, one action at a time,
    whenever its inputs exist; return the global order (fails the test on a deadlock)."""
    done: set[tuple[str, int, int]] = set()
    order, pos = [], [0] * schedule.num_ranks
    last = schedule.num_stages - 1
    while any(p < len(s) for p, s in zip(pos, schedule.steps)):
        moved = False
        for r, steps in enumerate(schedule.steps):
            if pos[r] == len(steps):
                continue
            step = steps[pos[r]]
            acts = actions_of(step)
            needed = set()
            for a in acts:
                m, s = a.microbatch, a.stage
                if a.op == Op.F and s > 0:
                    needed.add(("F", m, s - 1))
                if a.op in (Op.B, Op.BW):
                    needed.add(("F", m, s))
                    if s < last:
                        needed.add(("Bin", m, s + 1))
                if a.op == Op.W:
                    needed.add(("B", m, s))
            if needed <= done:
                for a in acts:
                    m, s = a.microbatch, a.stage
                    done |= {Op.F: {("F", m, s)}, Op.B: {("B", m, s), ("Bin", m, s)},
                             Op.W: {("W", m, s)}, Op.BW: {("Bin", m, s), ("W", m, s)}}[a.op]
                    order.append(a)
                pos[r] += 1
                moved = True
        assert moved, f"deadlock at {[str(s[p]) for p, s in zip(pos, schedule.steps) if p < len(s)]}"
    return order


@pytest.mark.parametrize("name,ranks,chunks", CASES)
def test_every_chunk_once_and_dependencies_hold(name, ranks, chunks):
    schedule = build_schedule(name, ranks, chunks)
    check_schedule(schedule)
    order = walk(schedule)
    forward = Counter((a.microbatch, a.stage) for a in order if a.op == Op.F)
    input_grad = Counter((a.microbatch, a.stage) for a in order if a.op in (Op.B, Op.BW))
    weight_grad = Counter((a.microbatch, a.stage) for a in order if a.op in (Op.W, Op.BW))
    every = {(m, s) for m in range(chunks) for s in range(schedule.num_stages)}
    for counts in (forward, input_grad, weight_grad):
        assert set(counts) == every and set(counts.values()) == {1}
    for rank, steps in enumerate(schedule.steps):  # each action on the rank holding its stage copy
        for step in steps:
            for a in actions_of(step):
                assert schedule.placement[a.stage_id] == rank
                assert a.direction == schedule.directions[a.microbatch]


def test_dualpipe_placement_and_directions():
    pp = 8
    s = build_schedule("dualpipe", pp, 20)
    assert s.num_stages == pp and s.duplicated_stages
    for r in range(pp):
        assert s.stages_of(r) == sorted([StageId(r, 0), StageId(pp - 1 - r, 1)])
    # The first and the last stage live on the same rank (embedding and head, shared with MTP).
    assert {s.rank_of(0, 0), s.rank_of(pp - 1, 1)} == {0}
    assert {s.rank_of(pp - 1, 0), s.rank_of(0, 1)} == {pp - 1}
    # Micro-batches enter from both ends: half go down, half go up.
    assert Counter(s.directions) == {0: 10, 1: 10}
    firsts = {a.direction: a for a in (s.steps[0][0], s.steps[pp - 1][0])}
    assert firsts[0].stage == 0 and firsts[1].stage == 0


def test_dualpipev_placement_turns_on_last_rank():
    n = 4
    s = build_schedule("dualpipev", n, 8)
    assert s.num_stages == 2 * n and not s.duplicated_stages
    for r in range(n):
        assert [sid.stage for sid in s.stages_of(r)] == [r, 2 * n - 1 - r]
    assert s.rank_of(n - 1, 0) == s.rank_of(n, 0) == n - 1  # the turn is local
    assert s.rank_of(0, 0) == s.rank_of(2 * n - 1, 0) == 0  # first and last stage together


def test_1f1b_shape():
    s = build_schedule("1f1b", 4, 8)
    for r, steps in enumerate(s.steps):
        ops = [a.op for a in steps]
        warmup = ops.index(Op.BW) - 1  # the first steady-state F precedes the first BW
        assert warmup == 4 - 1 - r
        assert set(ops) == {Op.F, Op.BW}
    assert not s.splits_backward


def test_zb1p_splits_every_backward_and_defers_w_by_rank():
    s = build_schedule("zb1p", 4, 8)
    assert s.splits_backward
    for r, steps in enumerate(s.steps):
        assert Counter(a.op for a in steps) == {Op.F: 8, Op.B: 8, Op.W: 8}
        owed = max_owed = 0
        for a in steps:
            owed += (a.op == Op.B) - (a.op == Op.W)
            max_owed = max(max_owed, owed)
        assert max_owed == r + 1  # rank r owes at most r W's between steps (r + 1 right after a B)


def test_dualpipe_has_overlapped_pairs_and_split_backwards():
    s = build_schedule("dualpipe", 4, 12)
    pairs = [step for steps in s.steps for step in steps if isinstance(step, FB)]
    assert pairs and all(p.forward.op == Op.F and p.backward.op == Op.BW for p in pairs)
    assert s.splits_backward


def test_format_reads_like_the_figure():
    text = build_schedule("dualpipev", 2, 4).format()
    lines = text.splitlines()
    assert lines[0].startswith("DualPipeV: 2 ranks, 4 stages, 4 micro-batches")
    assert lines[1].startswith("rank 0: F0@0 F1@0 F2@0 F0@3")
    assert "&" in text and str(build_schedule("dualpipev", 2, 4)) == text


@pytest.mark.parametrize(
    "name,ranks,chunks,words",
    [
        ("dualpipe", 3, 12, ["num_ranks", "even", "3"]),
        ("dualpipe", 4, 6, ["num_microbatches", ">= 2 x num_ranks = 8", "6"]),
        ("dualpipe", 4, 9, ["num_microbatches", "even", "9"]),
        ("dualpipev", 3, 5, ["num_microbatches", "6", "5"]),
        ("dualpipev", 0, 4, ["num_ranks", "0"]),
        ("zb1p", 4, 3, ["num_microbatches", ">= 4", "3"]),
        ("1f1b", 0, 3, ["num_stages", "0"]),
        ("1f1b", 2, 0, ["num_microbatches", "0"]),
        ("gpipe", 2, 4, ["'gpipe'", "1f1b", "dualpipev"]),
    ],
)
def test_errors_name_parameter_value_and_fix(name, ranks, chunks, words):
    with pytest.raises(ScheduleError) as err:
        build_schedule(name, ranks, chunks)
    assert isinstance(err.value, ValueError)
    for word in words:
        assert word in str(err.value)
    assert "\n" not in str(err.value)


def test_checker_catches_broken_schedules():
    good = build_schedule("1f1b", 2, 2)

    def with_rank0(steps):
        return Schedule(good.name, good.num_ranks, good.num_stages, good.num_microbatches,
                        (tuple(steps), good.steps[1]), good.placement, good.directions)

    r0 = list(good.steps[0])
    with pytest.raises(ScheduleError, match="appears 0 times"):
        check_schedule(with_rank0(r0[:-1]))
    with pytest.raises(ScheduleError, match="appears 2 times"):
        check_schedule(with_rank0(r0 + [r0[0]]))
    with pytest.raises(ScheduleError, match="deadlocks"):  # backward before its own forward
        check_schedule(with_rank0([r0[2], r0[0], r0[1], r0[3]]))
    with pytest.raises(ScheduleError, match="held by rank 1"):
        check_schedule(with_rank0([Action(Op.F, 0, 1)] + r0[1:]))
