"""When each rank posts each stage-to-stage transfer, so that no schedule can deadlock under NCCL.

Under NCCL a send may complete only once the peer has posted the matching receive, and the batches of
one rank run one after the other (one stream). Such a system cannot deadlock if

1. the ranks that talk to each other form a tree (every schedule here is a chain: rank r talks to r-1
   and r+1), and
2. for each pair of ranks, both post the messages between them (both directions) in one same order,
   each batch a contiguous piece of that order, a send no earlier than its producing step and a
   receive no later than its consuming step:

if every rank were stuck, each on a batch waiting for some peer, the waits would form a cycle, which in
a tree has two neighbours waiting on each other; but of two ranks that post one shared order, the one
further along has posted everything the other waits for, so it is not waiting on the other. The order is
that of a timeline of the schedule (costs F=1, B=W=1, BW=2): messages sorted by when they are produced,
which makes every send come after what its rank needed earlier, and every receive before what it is
needed for.

`plan_transfers` gives, for one rank, the batch to post before each of its steps (and one after the
last): the sends of the step before and the receives of this step, with each peer; and, posted ahead,
the receives the next step needs where the shared order allows it (a rank may do so or not on its
own, as it changes only when, not in which order, it posts).
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

from .actions import FB, Op, Schedule, ScheduleError, actions_of


class Message(NamedTuple):
    kind: str  # "act" (to the next stage) or "grad" (to the previous stage)
    microbatch: int
    stage: int  # the stage that receives it


class Post(NamedTuple):
    """One transfer as posted by one rank: what, with whom, and whether this rank sends it."""

    msg: Message
    peer: int
    send: bool


_COST = {Op.F: 1.0, Op.B: 1.0, Op.W: 1.0, Op.BW: 2.0}


def messages_of(schedule: Schedule, action, forward_only: bool):
    """(received, sent): the messages `action` consumes and produces, with the other rank of each
    (which may be its own rank: a local hand-over, not a transfer)."""
    s, m, d = action.stage, action.microbatch, action.direction
    received, sent = [], []
    if action.op == Op.F:
        if s > 0:
            received.append((Message("act", m, s), schedule.rank_of(s - 1, d)))
        if s < schedule.num_stages - 1:
            sent.append((Message("act", m, s + 1), schedule.rank_of(s + 1, d)))
    elif action.op in (Op.B, Op.BW) and not forward_only:
        if s < schedule.num_stages - 1:
            received.append((Message("grad", m, s), schedule.rank_of(s + 1, d)))
        if s > 0:
            sent.append((Message("grad", m, s - 1), schedule.rank_of(s - 1, d)))
    return received, sent


def _steps(schedule: Schedule, rank: int, forward_only: bool):
    """The rank's steps as (cost, received, sent); forward-only keeps the forwards alone."""
    out = []
    for step in schedule.steps[rank]:
        actions = [a for a in actions_of(step) if not forward_only or a.op == Op.F]
        if not actions:
            continue
        received, sent = [], []
        for a in actions:
            r, s = messages_of(schedule, a, forward_only)
            received += r
            sent += s
        cost = 3.0 if isinstance(step, FB) and not forward_only else sum(_COST[a.op] for a in actions)
        out.append((cost, received, sent))
    return out


def produced_at(schedule: Schedule, forward_only: bool) -> dict[Message, float]:
    """When each message is produced on an as-soon-as-possible timeline of the schedule."""
    steps = [_steps(schedule, r, forward_only) for r in range(schedule.num_ranks)]
    done: dict[Message, float] = {}
    position, free = [0] * schedule.num_ranks, [0.0] * schedule.num_ranks
    progress = True
    while progress:
        progress = False
        for rank, own in enumerate(steps):
            while position[rank] < len(own):
                cost, received, sent = own[position[rank]]
                if any(msg not in done for msg, _ in received):
                    break
                end = max([free[rank], *(done[msg] for msg, _ in received)]) + cost
                done.update((msg, end) for msg, _ in sent)
                free[rank], position[rank] = end, position[rank] + 1
                progress = True
    if any(p < len(own) for p, own in zip(position, steps)):
        raise RuntimeError(f"{schedule.name}: the schedule cannot run (run check_schedule for details)")
    return done


def _check_tree(schedule: Schedule) -> None:
    """Condition 1: the ranks that exchange stage data form a tree (no cycle)."""
    parent = list(range(schedule.num_ranks))

    def root(r: int) -> int:
        while parent[r] != r:
            r = parent[r]
        return r

    edges = {tuple(sorted((a, b))) for a, b in
             ((schedule.rank_of(sid.stage, sid.direction), schedule.rank_of(sid.stage + 1, sid.direction))
              for sid in schedule.placement if sid.stage + 1 < schedule.num_stages) if a != b}
    for a, b in sorted(edges):
        if root(a) == root(b):
            raise ScheduleError(
                f"{schedule.name}: ranks {a} and {b} close a cycle of ranks that pass stage data; "
                "the executor's transfer order is proven free of deadlock only when those ranks form a "
                "tree (a chain, as in 1F1B, ZB1P, DualPipe and DualPipeV)."
            )
        parent[root(a)] = root(b)


def plan_transfers(schedule: Schedule, rank: int, forward_only: bool = False, ahead: bool = True) -> list[list[Post]]:
    """posts[i]: what `rank` posts in one batch before its i-th step (forward-only: i-th forward step),
    posts[-1]: after its last step. Steps that do not run in forward-only mode are left out of i.
    `ahead`: also post the next step's receives where the order allows (a choice each rank may make
    on its own: it changes when a receive is posted, not the order)."""
    _check_tree(schedule)
    when = produced_at(schedule, forward_only)
    steps = _steps(schedule, rank, forward_only)
    produced_by, consumed_by = {}, {}
    order: dict[int, list[Post]] = defaultdict(list)  # per peer: the order shared with that peer
    for i, (_, received, sent) in enumerate(steps):
        for msg, src in received:
            if src != rank:
                consumed_by[msg] = i
                order[src].append(Post(msg, src, False))
        for msg, dst in sent:
            if dst != rank:
                produced_by[msg] = i
                order[dst].append(Post(msg, dst, True))
    for posts in order.values():
        posts.sort(key=lambda p: (when[p.msg], p.msg))  # the same key on both ranks of the pair
    plan: list[list[Post]] = [[] for _ in range(len(steps) + 1)]
    for _, posts in sorted(order.items()):
        posted = 0
        for i in range(len(steps) + 1):
            due = [k for k, p in enumerate(posts)
                   if (p.send and produced_by[p.msg] == i - 1) or (not p.send and consumed_by[p.msg] == i)]
            upto = max([posted, *(k + 1 for k in due)])
            while ahead and upto < len(posts) and not posts[upto].send and consumed_by[posts[upto].msg] == i + 1:
                upto += 1  # the next step's input, posted ahead
            for p in posts[posted:upto]:
                if p.send and produced_by[p.msg] >= i:
                    raise RuntimeError(f"rank {rank}: transfer plan would send {p.msg} before step "
                                       f"{produced_by[p.msg]} produces it (a bug in the plan)")
            plan[i] += posts[posted:upto]
            posted = upto
    return plan
