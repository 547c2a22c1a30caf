"""The transfer plan, run in one process under rendezvous rules (a batch completes only when every
message in it has been posted by both ranks; a rank goes on only once its batch completes), finishes
for every schedule and size, matches messages by order as NCCL does, and posts each receive before
the step that reads it and each send after the step that makes it."""

from __future__ import annotations

from collections import defaultdict

import pytest
from moetron.parallel import build_schedule
from moetron.parallel.actions import Op, Schedule, ScheduleError, StageId, actions_of
from moetron.parallel.transfer_plan import messages_of, plan_transfers

CASES = [(name, pp, mb) for pp in (2, 4, 6, 8) for name, mb in
         (("1f1b", pp), ("1f1b", 3 * pp + 1), ("zb1p", 2 * pp + 1), ("dualpipe", 2 * pp), ("dualpipe", 4 * pp + 2),
          ("dualpipev", 2 * pp), ("dualpipev", 3 * pp + 1))]


def rendezvous_run(schedule, forward_only: bool, ahead) -> list[list[tuple]]:
    """Run every rank's plan under rendezvous rules; return per pair and direction the messages in the
    order they were sent and received."""
    n = schedule.num_ranks
    plans = [plan_transfers(schedule, r, forward_only, ahead if ahead != "mixed" else r % 2 == 0) for r in range(n)]
    point = [0] * n  # the batch each rank is at
    posted = [set() for _ in range(n)]  # (msg, peer, send) a rank has posted so far
    order = defaultdict(list)
    progress = True
    while progress:
        progress = False
        for r in range(n):
            while point[r] < len(plans[r]):
                batch = plans[r][point[r]]
                posted[r].update(batch)
                if not all((p.msg, r, not p.send) in posted[p.peer] for p in batch):
                    break
                for p in batch:
                    order[(r, p.peer, p.send)].append(p.msg)
                point[r] += 1
                progress = True
    stuck = [r for r in range(n) if point[r] < len(plans[r])]
    assert not stuck, f"{schedule.name} deadlocks under rendezvous sends on ranks {stuck} at {[point[r] for r in stuck]}"
    return order


@pytest.mark.parametrize("forward_only,ahead", [(False, True), (True, True), (False, False), (False, "mixed")])
@pytest.mark.parametrize("name,pp,mb", CASES)
def test_plan_runs_under_rendezvous_and_matches_by_order(name, pp, mb, forward_only, ahead):
    """`mixed`: even ranks post receives ahead, odd ranks do not."""
    schedule = build_schedule(name, pp, mb)
    order = rendezvous_run(schedule, forward_only, ahead)
    for (r, peer, send), msgs in order.items():
        if send:
            assert msgs == order[(peer, r, False)], f"rank {r} sends to {peer} in another order than it receives"


@pytest.mark.parametrize("name,pp,mb", CASES)
def test_plan_is_causal(name, pp, mb):
    schedule = build_schedule(name, pp, mb)
    for rank in range(pp):
        plan = plan_transfers(schedule, rank)
        at = {(p.msg, p.send): i for i, posts in enumerate(plan) for p in posts}
        steps = schedule.steps[rank]
        assert len(plan) == len(steps) + 1
        for i, step in enumerate(steps):
            for a in actions_of(step):
                received, sent = messages_of(schedule, a, forward_only=False)
                for msg, src in received:
                    if src != rank:
                        assert at[(msg, False)] <= i, f"rank {rank}: {msg} posted after step {i} needs it"
                for msg, dst in sent:
                    if dst != rank:
                        assert at[(msg, True)] == i + 1, f"rank {rank}: {msg} not sent right after step {i}"
        assert len(at) == sum(len(p) for p in plan)


def test_a_receive_is_posted_ahead():
    """1F1B's steady state: the gradient a backward needs is posted with the forward before it."""
    schedule = build_schedule("1f1b", 4, 8)
    plan = plan_transfers(schedule, 1)
    steps = schedule.steps[1]
    ahead = [i for i, posts in enumerate(plan) for p in posts if not p.send and i < len(steps)
             and not any(p.msg in [m for m, _ in messages_of(schedule, a, False)[0]] for a in actions_of(steps[i]))]
    assert ahead, "no receive is posted before the step ahead of the one that reads it"
    assert all(steps[i + 1].op in (Op.BW, Op.F) for i in ahead)


def test_a_cycle_of_ranks_is_refused():
    """Interleaved stages (stage s on rank s mod 3) pass data 0->1->2->0: outside what the order proves."""
    placement = {StageId(s, 0): s % 3 for s in range(6)}
    schedule = Schedule("interleaved", 3, 6, 3, ((), (), ()), placement, (0, 0, 0))
    with pytest.raises(ScheduleError, match="close a cycle"):
        plan_transfers(schedule, 0)
