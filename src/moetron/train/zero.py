"""ZeRO stage 1 for MasterAdamW: the optimizer state (BF16 moments, step counts) sharded over the replicas.

Why not DeepSpeed's ZeRO-1: its optimizer wraps the model engine and owns the backward, gradient
accumulation and reduction (flat FP16/BF16 buckets, loss scaling), which collides with the pipeline
executor that already runs the backward per chunk and sums DualPipe's two stage copies; it ships its own
Adam (FP32 moments) rather than our FP32-master / BF16-moment AdamW; its partitions are flat slices that
split parameters, so expert weights sharded over EP and replicated over EDP would need a second engine;
and installing it compiles CUDA ops. Stage 1 itself is small, so it is done here:

- Every parameter has one owner per replica group (`dense` params: the DP group of the stage; routed
  experts: the expert-data-parallel group). Owners are chosen greedily by size, whole parameters, in a
  fixed order, so every member computes the same partition and the update of each element is the same
  arithmetic as on one process (exact equivalence).
- Gradients are all-reduced and averaged over the group before this optimizer runs (the trainer does
  it, because the global grad-norm clip needs them); each rank then updates only what it owns, holding
  the moments of only that (1/group of the state), and the owners broadcast the new values: one flat
  broadcast per member per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moetron.config import OptimConfig
from moetron.train.optim import MasterAdamW


@dataclass
class ShardGroup:
    """Parameters replicated over `ranks` (global ranks, sorted; `group` their process group)."""

    ranks: list[int]
    group: dist.ProcessGroup | None
    params: list[tuple[str, torch.nn.Parameter]]  # (key, parameter), the same order on every member

    def owners(self) -> list[int]:
        """Index into `ranks` of each parameter's owner: greedy, largest first, ties by order."""
        load = [0] * len(self.ranks)
        owner = [0] * len(self.params)
        order = sorted(range(len(self.params)), key=lambda i: -self.params[i][1].numel())
        for i in order:
            r = min(range(len(self.ranks)), key=lambda j: (load[j], j))
            owner[i] = r
            load[r] += self.params[i][1].numel()
        return owner


class ZeroAdamW:
    """MasterAdamW over the parameters this rank owns, plus the broadcast that keeps replicas equal.
    `shard=False` gives every rank every parameter (plain data parallelism, for comparison)."""

    def __init__(self, groups: list[ShardGroup], cfg: OptimConfig, rank: int, shard: bool = True):
        self.groups, self.rank = groups, rank
        self.owned: dict[str, torch.nn.Parameter] = {}
        self._plan = []  # per group: [(member rank, [params it owns])]
        for g in groups:
            owners = g.owners() if shard and len(g.ranks) > 1 else [g.ranks.index(rank)] * len(g.params)
            per_member = [(r, [p for (_, p), o in zip(g.params, owners) if o == j]) for j, r in enumerate(g.ranks)]
            if shard and len(g.ranks) > 1:
                self._plan.append((g, per_member))
            for (key, p), o in zip(g.params, owners):
                if g.ranks[o] == rank:
                    self.owned[key] = p
        self.all_params = [p for g in groups for _, p in g.params]
        self.inner = MasterAdamW(list(self.owned.items()), cfg) if self.owned else None
        self.key_of = {id(p): k for k, p in self.owned.items()}

    def set_lr(self, lr: float) -> None:
        if self.inner is not None:
            self.inner.set_lr(lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.all_params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        if self.inner is not None:
            self.inner.step()
        for g, per_member in self._plan:
            for member, params in per_member:
                if not params:
                    continue
                flat = torch.cat([p.detach().reshape(-1) for p in params])
                dist.broadcast(flat, src=member, group=g.group)
                if member != self.rank:
                    offset = 0
                    for p in params:
                        p.copy_(flat[offset: offset + p.numel()].view_as(p))
                        offset += p.numel()

    # ---- state for checkpoints: per owned parameter key --------------------------------------------------
    def init_state(self) -> None:
        """Create the (zero) moments now, as the first step would, so a checkpoint can be loaded into them."""
        if self.inner is None:
            return
        for group in self.inner.param_groups:
            for p in group["params"]:
                state = self.inner.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.inner.moment_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.inner.moment_dtype)

    def state_of(self, key: str) -> dict[str, torch.Tensor]:
        return self.inner.state[self.owned[key]]

    def shard_numel(self) -> int:
        """Elements of optimizer state (moments) this rank holds."""
        return sum(p.numel() for p in self.owned.values())
