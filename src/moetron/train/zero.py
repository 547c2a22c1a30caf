"""ZeRO-1 the way Megatron's distributed optimizer does it, with the report's precisions (arXiv 2412.19437 §3.3).

A `ShardGroup` is a set of parameters held identically by `ranks`: the data-parallel replicas of a stage
(the expert-data-parallel replicas for routed experts), and also DualPipe's second copy of the stage and
the last stage's copy of the embedding -- all of them are just more holders of the same tensors. Each
group's parameters (in key order, the same on every member) are cut into buckets of flat FP32 buffers:

- gradients accumulate in FP32 (`param.main_grad`, a view of the bucket; autograd's BF16 `.grad` is added
  there after every backward and dropped), across micro-batches and the pipeline's chunks;
- the bucket is reduce-scattered over the group: member i receives the sum of elements
  [i * shard, (i + 1) * shard) -- its shard -- and divides by dp (not an all-reduce: half the bytes);
- member i keeps FP32 master weights and BF16 AdamW moments for its shard only, and updates them;
- the updated shards, cast to the parameters' dtype, are all-gathered into every holder's parameters.

So a rank holds its parameters in the compute dtype, one FP32 gradient per parameter, and 1/n of the FP32
masters and moments (n = holders). Shards split parameters (and routed experts); the checkpoint names each
shard's pieces by the full-model key (per global expert for stacks) with their offsets (checkpoint/state.py
`FlatChunk`), so a checkpoint does not depend on the layout. Elements are updated by the same elementwise
arithmetic whichever shard holds them, so every layout computes what one process computes.

`shard=False` (parallel.zero1=false) is plain data parallelism: an all-reduce, and every member holds the
whole state.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moetron.checkpoint.state import FlatChunk
from moetron.comm.recorder import FlightRecorder, record
from moetron.config import OptimConfig
from moetron.train.optim import DTYPES, adamw_update

BUCKET_NUMEL = 50_000_000  # elements per bucket (200 MB of FP32 gradients): the unit of one reduce-scatter


@dataclass
class ShardGroup:
    """Parameters held identically by `ranks` (global ranks, sorted; `group` their process group)."""

    ranks: list[int]
    group: dist.ProcessGroup | None
    params: list[tuple[str, torch.nn.Parameter]]  # (key, parameter), the same order on every member
    expert_offsets: dict[str, int] = field(default_factory=dict)  # stack name -> global id of its row 0


@dataclass
class Piece:
    """Elements [start, stop) of a bucket that belong to checkpoint key `key` from its element `offset`."""

    key: str
    length: int  # elements of the key's whole tensor
    offset: int
    start: int
    stop: int


class Bucket:
    """One flat run of a group's parameters; member `index` of `members` owns [lo, lo + shard)."""

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]], group: ShardGroup, rank: int,
                 shard: bool, moment_dtype: torch.dtype):
        self.params, self.group = params, group
        self.members = len(group.ranks) if shard else 1
        self.index = group.ranks.index(rank) if shard else 0
        self.sharded = shard and self.members > 1
        self.numel = sum(p.numel() for _, p in params)
        self.shard = -(-self.numel // self.members)
        self.lo = self.index * self.shard
        first = params[0][1]
        self.grad = torch.zeros(self.shard * self.members, dtype=torch.float32, device=first.device)
        self.segments = []  # (key, parameter, start) in the flat buffer
        start = 0
        for key, p in params:
            p.main_grad = self.grad[start:start + p.numel()].view_as(p)
            self.segments.append((key, p, start))
            start += p.numel()
        self.master = torch.zeros(self.shard, dtype=torch.float32, device=first.device)
        self.exp_avg = torch.zeros(self.shard, dtype=moment_dtype, device=first.device)
        self.exp_avg_sq = torch.zeros(self.shard, dtype=moment_dtype, device=first.device)
        self.decay = torch.zeros(self.shard, dtype=torch.bool, device=first.device)
        for _, p, begin in self.segments:  # no weight decay for vectors (norm weights), as Megatron does
            a, b = self._local(begin, begin + p.numel())
            if a < b and p.dim() >= 2:
                self.decay[a:b] = True
        self.load_masters()

    def _local(self, begin: int, end: int, member: int | None = None) -> tuple[int, int]:
        """[begin, end) of the flat buffer intersected with `member`'s shard, in shard coordinates."""
        lo = (self.index if member is None else member) * self.shard
        return max(begin, lo) - lo, min(end, lo + self.shard) - lo

    def pieces(self, member: int | None = None) -> list[Piece]:
        """The checkpoint keys in `member`'s shard (default: this rank's); routed-expert rows are keys."""
        out = []
        for key, p, begin in self.segments:
            rows = p.shape[0] if key in self.group.expert_offsets else 1
            row = p.numel() // rows
            for i in range(rows):
                a, b = self._local(begin + i * row, begin + (i + 1) * row, member)
                if a < b:
                    name = f"{key}.{self.group.expert_offsets[key] + i}" if key in self.group.expert_offsets else key
                    first = a + self.shard * (self.index if member is None else member)  # in the flat buffer
                    out.append(Piece(name, row, first - begin - i * row, a, b))
        return out

    @torch.no_grad()
    def load_masters(self) -> None:
        """FP32 masters of this shard from the parameters (at start, and after loading a model-only state)."""
        for _, p, begin in self.segments:
            a, b = self._local(begin, begin + p.numel())
            if a < b:
                lo = self.lo + a - begin
                self.master[a:b] = p.detach().reshape(-1)[lo:lo + b - a].float()

    def my_grad(self) -> torch.Tensor:
        return self.grad[self.lo:self.lo + self.shard]

    @torch.no_grad()
    def reduce(self, divisor: float, timed=contextlib.nullcontext) -> None:
        """Sum the holders' gradients into this member's shard (reduce-scatter; all-reduce unsharded).
        `timed()` wraps the collective (the trainer's count of time spent in DP communication)."""
        if self.sharded:
            out = torch.empty(self.shard, dtype=self.grad.dtype, device=self.grad.device)
            with timed():
                reduce_scatter(out, self.grad, self.group.group)
            self.my_grad().copy_(out)
        elif len(self.group.ranks) > 1:
            with timed():
                dist.all_reduce(self.grad, group=self.group.group)
        if divisor != 1:
            self.my_grad().div_(divisor)

    @torch.no_grad()
    def gather(self, timed=contextlib.nullcontext) -> None:
        """Every holder's parameters <- the members' updated masters, in the parameters' dtype."""
        dtype = self.params[0][1].dtype
        mine = self.master.to(dtype)
        if self.sharded:
            flat = torch.empty(self.shard * self.members, dtype=dtype, device=mine.device)
            with timed():
                dist.all_gather_into_tensor(flat, mine, group=self.group.group)
        else:
            flat = mine
        for _, p, begin in self.segments:
            p.copy_(flat[begin:begin + p.numel()].view_as(p))


class ZeroAdamW:
    """AdamW over the shards of every group this rank is a member of (see the module docstring)."""

    def __init__(self, groups: list[ShardGroup], cfg: OptimConfig, rank: int, shard: bool = True,
                 bucket_numel: int = BUCKET_NUMEL, allocate: bool = True, flight: FlightRecorder | None = None):
        self.groups, self.cfg, self.rank, self.shard = groups, cfg, rank, shard
        self.flight = flight  # records each bucket's reduce-scatter and all-gather (for the hang watchdog)
        self.moment_dtype = DTYPES[cfg.moment_dtype]
        self.lr = cfg.lr
        self.all_params = [p for g in groups for _, p in g.params]
        self.runs = [(g, run) for g in groups for run in _runs(g.params, bucket_numel)]
        self.buckets: list[Bucket] = []
        self.step_count = torch.zeros((), dtype=torch.float32)
        self.comm_clock = None  # a WaitClock (train/timing.py) timing the gradient and parameter collectives
        if allocate:
            self.buckets = [Bucket(run, g, rank, shard, self.moment_dtype) for g, run in self.runs]

    def set_lr(self, lr: float) -> None:
        self.lr = lr

    def zero_grad(self) -> None:
        """Clear the FP32 accumulation buffers (before a step's first backward)."""
        for b in self.buckets:
            b.grad.zero_()
        for p in self.all_params:
            p.grad = None

    def _timed(self):
        return self.comm_clock.measure if self.comm_clock is not None else contextlib.nullcontext

    def reduce_gradients(self, divisor: float) -> None:
        for b in self.buckets:
            with self._record("reduce_scatter" if b.sharded else "all_reduce", b, "gradients"):
                b.reduce(divisor, self._timed())

    def _record(self, kind: str, b: Bucket, what: str):
        if len(b.group.ranks) == 1 or (kind == "all_gather" and not b.sharded):  # nothing goes over the wire
            return record(None, kind)
        return record(self.flight, kind, b.group.group, what=what, nbytes=b.grad.numel() * b.grad.element_size())

    def grad_sq_norm(self, device: torch.device) -> torch.Tensor:
        """Sum of squares of this rank's gradient shards (each element of the world is in one shard)."""
        total = torch.zeros((), dtype=torch.float64, device=device)
        for b in self.buckets:
            if b.sharded or b.group.ranks[0] == self.rank:  # unsharded: one member counts the group
                total += b.my_grad().double().pow(2).sum()
        return total

    @torch.no_grad()
    def scale_gradients(self, coef: float) -> None:
        for b in self.buckets:
            b.my_grad().mul_(coef)

    @torch.no_grad()
    def step(self) -> None:
        """Update this rank's shards, then all-gather the new values into every holder's parameters."""
        self.step_count += 1
        t = float(self.step_count)
        cfg = self.cfg
        for b in self.buckets:
            adamw_update(b.master, b.my_grad(), b.exp_avg, b.exp_avg_sq, b.decay, lr=self.lr,
                         betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay, step=t)
            with self._record("all_gather", b, "parameters"):
                b.gather(self._timed())

    def load_masters(self) -> None:
        for b in self.buckets:
            b.load_masters()

    # ---- checkpoint entries: per key (per global expert), 1-D, this rank's chunk of it ----------------------
    def entries(self) -> dict[str, FlatChunk]:
        """optim.<key>.exp_avg / .exp_avg_sq / master.<key> chunks and optim.<name>.step for this rank's shards."""
        out: dict[str, object] = {}
        for b in self.buckets:
            chunks_of: dict[str, list[tuple[int, int, int]]] = {}  # key -> (rank, offset, length) of every member
            for m in range(b.members):
                rank = b.group.ranks[m] if b.sharded else self.rank
                for piece in b.pieces(m):
                    chunks_of.setdefault(piece.key, []).append((rank, piece.offset, piece.stop - piece.start))
            for piece in b.pieces():
                for name, tensor in ((f"optim.{piece.key}.exp_avg", b.exp_avg),
                                     (f"optim.{piece.key}.exp_avg_sq", b.exp_avg_sq),
                                     (f"master.{piece.key}", b.master)):
                    out[name] = FlatChunk(tensor[piece.start:piece.stop], piece.offset, piece.length,
                                          chunks_of[piece.key])
            for key, _, _ in b.segments:
                out[f"optim.{key}.step"] = self.step_count
        return out

    def master_pieces(self) -> dict[str, torch.Tensor]:
        """key -> this rank's FP32 master elements of it (views): what the weight EMA averages."""
        return {piece.key: b.master[piece.start:piece.stop] for b in self.buckets for piece in b.pieces()}

    # ---- bytes this rank allocates (the dry run's accounting), from the shapes -----------------------------
    def _shards(self) -> list[int]:
        return [-(-sum(p.numel() for _, p in run) // (len(g.ranks) if self.shard else 1)) for g, run in self.runs]

    def gradient_bytes(self) -> int:
        return 4 * sum(s * (len(g.ranks) if self.shard else 1) for s, (g, _) in zip(self._shards(), self.runs))

    def master_bytes(self) -> int:
        return 4 * sum(self._shards())

    def moment_bytes(self) -> int:
        size = torch.empty((), dtype=self.moment_dtype).element_size()
        return 2 * size * sum(self._shards())


def reduce_scatter(out: torch.Tensor, flat: torch.Tensor, group: dist.ProcessGroup) -> None:
    """out <- member i's 1/n of the sum of `flat` over the group (a reduce-scatter). NCCL's moves (n-1)/n of
    the buffer per rank; gloo's reduce_scatter is an all-reduce underneath (twice the bytes), so on gloo this
    runs the ring itself: n-1 steps, each passing one partial sum to the next member."""
    if dist.get_backend(group) != "gloo":
        dist.reduce_scatter_tensor(out, flat, group=group)
        return
    n, me = dist.get_world_size(group), dist.get_rank(group)
    chunks = flat.view(n, -1)
    succ, pred = dist.get_global_rank(group, (me + 1) % n), dist.get_global_rank(group, (me - 1) % n)
    partial = chunks[(me - 1) % n].clone()
    for k in range(n - 1):  # after step k this rank holds the partial sum of chunk me - k - 2 (mod n)
        received = torch.empty_like(partial)
        ops = [dist.P2POp(dist.isend, partial, succ, group), dist.P2POp(dist.irecv, received, pred, group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        partial = received.add_(chunks[(me - k - 2) % n])
    out.copy_(partial)


def _runs(params: list[tuple[str, torch.nn.Parameter]], limit: int) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """Consecutive parameters in runs of at most `limit` elements (a larger parameter is a run of its own)."""
    runs, current, size = [], [], 0
    for key, p in params:
        if current and size + p.numel() > limit:
            runs.append(current)
            current, size = [], 0
        current.append((key, p))
        size += p.numel()
    if current:
        runs.append(current)
    return runs
