"""DualPipe and DualPipeV (DeepSeek-V3 report, section 3.2.1).

Both are built from one V-shaped per-rank program. A rank sees two chunks: phase 0 is the stage its
micro-batches reach first, phase 1 the one they reach on the way back. In DualPipeV (N ranks, 2N
stages) rank r holds stages r (phase 0) and 2N-1-r (phase 1) and micro-batches turn around on the
last rank. DualPipe (P ranks, P stages, every stage held twice) is two such V's facing each other:
half the micro-batches enter at rank 0 (direction 0), half at rank P-1 (direction 1); rank r holds
stage r of direction 0 and stage P-1-r of direction 1, and sits at position min(r, P-1-r) of its V.

The program is eight short phases, named as in the published figure (F0 = forward of phase 0,
B1 = backward of phase 1, W = a deferred weight gradient, F0&B1 = an overlapped pair):

    1 nF0        warm-up forwards of phase 0
    2 nF0F1      forwards of both phases
    3 nB1W1F1    backward (zero-bubble split), its weight gradient, a forward
    4 nF0B1F1B0  steady state: two overlapped forward+backward pairs
    5 nB1F1B0    phase 1 backward, an overlapped pair
    6 nB1B0      backwards of both phases, the later half split for zero bubble
    7 nWB0       deferred weight gradients interleaved with the last backwards
    8 nW         the remaining weight gradients
"""

from __future__ import annotations

from collections import deque

from .actions import FB, Action, Op, Schedule, StageId, Step, require


class _VRank:
    """Builds one rank's steps: position `pos` of a V with `n` ranks, `m` micro-batches per phase.

    `chunks[p]` is the stage copy of phase p and `first_mb[p]` its first micro-batch number.
    """

    def __init__(self, n: int, pos: int, m: int, chunks: tuple[StageId, StageId], first_mb: tuple[int, int]):
        self.n, self.pos, self.m = n, pos, m
        self.chunks, self.first_mb = chunks, first_mb
        self.next_forward = [0, 0]
        self.next_backward = [0, 0]
        self.owed: deque[Action] = deque()  # B's whose W is still to run, oldest first
        self.steps: list[Step] = []

    def _action(self, op: Op, phase: int, counter: list[int]) -> Action:
        mb = self.first_mb[phase] + counter[phase]
        counter[phase] += 1
        stage, direction = self.chunks[phase]
        return Action(op, mb, stage, direction)

    def f(self, phase: int) -> Action:
        return self._action(Op.F, phase, self.next_forward)

    def b(self, phase: int, zero_bubble: bool = False) -> Action:
        """Full backward, or with `zero_bubble` the input half B whose W is owed."""
        action = self._action(Op.B if zero_bubble else Op.BW, phase, self.next_backward)
        if zero_bubble:
            self.owed.append(action)
        return action

    def w(self) -> Action:
        b = self.owed.popleft()
        return Action(Op.W, b.microbatch, b.stage, b.direction)

    def build(self) -> list[Step]:
        n, pos, m, add = self.n, self.pos, self.m, self.steps.append
        outer = n - pos - 1  # ranks between this one and the turning point

        # 1 nF0: warm-up forwards.
        for _ in range(2 * outer):
            add(self.f(0))
        # 2 nF0F1
        for _ in range(pos + 1):
            add(self.f(0))
            add(self.f(1))
        # 3 nB1W1F1: split backward, its W at once, a forward.
        for _ in range(outer):
            add(self.b(1, zero_bubble=True))
            add(self.w())
            add(self.f(1))
        # 4 nF0B1F1B0: the steady state. The turning rank does its first pair one after the other,
        # which starts the phase-1 gradients one chunk earlier.
        for k in range(m - 2 * n + pos + 1):
            if k == 0 and outer == 0:
                add(self.f(0))
                add(self.b(1))
            else:
                add(FB(self.f(0), self.b(1)))
            add(FB(self.f(1), self.b(0)))
        # 5 nB1F1B0
        for _ in range(outer):
            add(self.b(1))
            add(FB(self.f(1), self.b(0)))
        # 6 nB1B0: from the middle on, backwards are split and their W's fill the tail.
        zero_bubble = False
        for k in range(pos + 1):
            if k == (pos + 1) // 2 and pos % 2 == 1:
                zero_bubble = True
            add(self.b(1, zero_bubble))
            if k == (pos + 1) // 2 and pos % 2 == 0:
                zero_bubble = True
            add(self.b(0, zero_bubble))
        # 7 nWB0
        for _ in range(outer):
            add(self.w())
            add(self.b(0, zero_bubble=True))
        # 8 nW
        while self.owed:
            add(self.w())
        return self.steps


def dualpipe(num_ranks: int, num_microbatches: int) -> Schedule:
    """DualPipe on `num_ranks` ranks and as many stages; each rank holds two stage copies."""
    require(
        isinstance(num_ranks, int) and num_ranks >= 2 and num_ranks % 2 == 0,
        f"DualPipe: num_ranks (the pipeline size PP) must be an even integer >= 2, got {num_ranks!r}: "
        "rank r pairs with rank PP-1-r, holding stages r and PP-1-r. Use an even PP, or DualPipeV, "
        "which runs on any number of ranks.",
    )
    require(
        isinstance(num_microbatches, int) and num_microbatches % 2 == 0 and num_microbatches >= 2 * num_ranks,
        f"DualPipe: num_microbatches must be an even integer >= 2 x num_ranks = {2 * num_ranks}, got "
        f"{num_microbatches!r}: half the micro-batches enter from each end and each half needs at "
        f"least PP = {num_ranks} to fill the pipeline. Use {2 * num_ranks} or more (even).",
    )
    p, half = num_ranks, num_microbatches // 2
    placement = {StageId(s, 0): s for s in range(p)} | {StageId(s, 1): p - 1 - s for s in range(p)}
    ranks = []
    for rank in range(p):
        down, up = StageId(rank, 0), StageId(p - 1 - rank, 1)
        if rank < p // 2:  # direction 0 reaches this rank first
            chunks, first_mb = (down, up), (0, half)
        else:
            chunks, first_mb = (up, down), (half, 0)
        ranks.append(_VRank(p // 2, min(rank, p - 1 - rank), half, chunks, first_mb).build())
    return Schedule(
        name="DualPipe",
        num_ranks=p,
        num_stages=p,
        num_microbatches=num_microbatches,
        steps=tuple(tuple(s) for s in ranks),
        placement=placement,
        directions=tuple(0 if mb < half else 1 for mb in range(num_microbatches)),
    )


def dualpipev(num_ranks: int, num_microbatches: int) -> Schedule:
    """DualPipeV: 2N stages on N ranks, rank r holds stages r and 2N-1-r (a V turning at rank N-1)."""
    require(
        isinstance(num_ranks, int) and num_ranks >= 1,
        f"DualPipeV: num_ranks must be a positive integer, got {num_ranks!r}.",
    )
    require(
        isinstance(num_microbatches, int) and num_microbatches >= 2 * num_ranks,
        f"DualPipeV: num_microbatches must be an integer >= 2 x num_ranks = {2 * num_ranks}, got "
        f"{num_microbatches!r}: the V has 2 x {num_ranks} stages to fill. Use {2 * num_ranks} or more.",
    )
    n, stages = num_ranks, 2 * num_ranks
    placement = {StageId(s, 0): min(s, stages - 1 - s) for s in range(stages)}
    ranks = [
        _VRank(n, r, num_microbatches, (StageId(r, 0), StageId(stages - 1 - r, 0)), (0, 0)).build()
        for r in range(n)
    ]
    return Schedule(
        name="DualPipeV",
        num_ranks=n,
        num_stages=stages,
        num_microbatches=num_microbatches,
        steps=tuple(tuple(s) for s in ranks),
        placement=placement,
        directions=(0,) * num_microbatches,
    )
