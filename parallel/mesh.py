"""The process mesh: PP x DP x TP ranks, EP carved from DP as in Megatron, and the node map.

Rank order (TP fastest, then DP, then PP):  rank = (pp_index * dp + dp_index) * tp + tp_index;
with order="tp-pp-dp" PP varies before DP (rank = (dp_index * pp + pp_index) * tp + tp_index), so the DP and
EP groups of a stage span the nodes while a pipeline stays inside one.
  pp group    same (dp, tp) index, one rank per stage        (pipeline point-to-point)
  dp group    same (pp, tp) index: the ranks of one stage that see different tokens (dense-gradient
              all-reduce / ZeRO-1, and the load all-reduce of the bias update)
  ep group    ep consecutive members of the dp group: dp index = edp_index * ep + ep_index
  edp group   same (pp, tp, ep_index): the replicas of one expert block (expert-gradient all-reduce)
  tp group    same (pp, dp) index
Nodes: global rank g lives on node g // ranks_per_node at local index g % ranks_per_node.
  node group  all ranks of my node;  rail group  the ranks with my local index on every node.
EP groups must cover their nodes evenly (the same number of EP ranks on each), so that two-hop
dispatch has one rail peer per node; the EP-restricted rail / intra-node groups live in `mesh.ep`.

`MeshLayout` is pure arithmetic (testable without processes); `ProcessMesh` creates the groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from moetron.comm.errors import ParameterError
from moetron.comm.layout import EPGroup, local_size_of, new_ep_groups

RANK_ORDERS = ("tp-dp-pp", "tp-pp-dp")  # fastest-varying index first


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class MeshLayout:
    world_size: int
    ranks_per_node: int
    pp: int = 1
    ep: int = 1
    tp: int = 1
    order: str = "tp-dp-pp"  # or "tp-pp-dp": rank = (dp_index * pp + pp_index) * tp + tp_index

    def __post_init__(self) -> None:
        if self.order not in RANK_ORDERS:
            raise ParameterError("order", self.order, " | ".join(RANK_ORDERS))
        for name in ("world_size", "ranks_per_node", "pp", "ep", "tp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ParameterError(name, value, "a positive integer")
        w = self.world_size
        if w % self.ranks_per_node:
            raise ParameterError("ranks_per_node", self.ranks_per_node,
                          f"a divisor of the world size {w}: one of {_divisors(w)}",
                          "Every node runs the same number of ranks.")
        if w % (self.pp * self.tp):
            raise ParameterError("pp", self.pp,
                          f"a value with pp x tp (tp = {self.tp}) dividing the world size {w}; pp in "
                          f"{[d for d in _divisors(w) if (w // d) % self.tp == 0]}",
                          "The data-parallel size is world / (pp x tp).")
        if self.dp % self.ep:
            raise ParameterError("ep", self.ep,
                          f"a divisor of the data-parallel size dp = world {w} / (pp {self.pp} x tp {self.tp}) "
                          f"= {self.dp}: one of {_divisors(self.dp)}",
                          "Expert parallelism is carved from the data-parallel ranks of a stage.")
        for ranks in self.ep_groups():  # every EP group must cover its nodes evenly
            local_size_of(ranks, self.ranks_per_node)

    # ---- sizes and coordinates ---------------------------------------------------------------------------
    @property
    def dp(self) -> int:
        return self.world_size // (self.pp * self.tp)

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    def rank_of(self, pp: int, dp: int, tp: int = 0) -> int:
        if self.order == "tp-pp-dp":
            return (dp * self.pp + pp) * self.tp + tp
        return (pp * self.dp + dp) * self.tp + tp

    def coords(self, rank: int) -> dict[str, int]:
        """pp, dp, tp, ep, edp indices, node and local index of a global rank."""
        tp, rest = rank % self.tp, rank // self.tp
        dp, pp = rest % self.dp, rest // self.dp
        if self.order == "tp-pp-dp":
            pp, dp = rest % self.pp, rest // self.pp
        return dict(pp=pp, dp=dp, tp=tp, ep=dp % self.ep, edp=dp // self.ep,
                    node=rank // self.ranks_per_node, local=rank % self.ranks_per_node)

    # ---- partitions of the world into groups (lists of global ranks, sorted) -------------------------------
    def pp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def ep_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, g * self.ep + e, t) for e in range(self.ep)]
                for p in range(self.pp) for t in range(self.tp) for g in range(self.edp)]

    def edp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, g * self.ep + e, t) for g in range(self.edp)]
                for p in range(self.pp) for t in range(self.tp) for e in range(self.ep)]

    def node_groups(self) -> list[list[int]]:
        r = self.ranks_per_node
        return [list(range(n * r, (n + 1) * r)) for n in range(self.num_nodes)]

    def rail_groups(self) -> list[list[int]]:
        r = self.ranks_per_node
        return [[n * r + lo for n in range(self.num_nodes)] for lo in range(r)]

    def group_of(self, kind: str, rank: int) -> list[int]:
        """The ranks of `rank`'s group of one kind: pp, dp, tp, ep, edp, node or rail."""
        for ranks in getattr(self, f"{kind}_groups")():
            if rank in ranks:
                return ranks
        raise ValueError(f"rank {rank} is outside the world of {self.world_size}")

    def check_experts(self, num_experts: int) -> None:
        if num_experts % self.ep:
            raise ParameterError("ep", self.ep,
                          f"a divisor of the number of routed experts ({num_experts}) and of dp ({self.dp})",
                          "Experts are sharded in equal blocks over the EP ranks.")


KINDS = ("pp", "dp", "tp", "ep", "edp", "node", "rail")


class ProcessMesh:
    """The groups of one rank. Creating it is COLLECTIVE (every rank, same arguments, after
    init_process_group): torch requires every process to take part in every new_group call.

    Attributes: layout, rank, coords (dict), <kind>_group and <kind>_ranks for every kind in KINDS,
    and `ep`: the EPGroup (with its rail and intra-node groups) the dispatcher takes."""

    def __init__(self, layout: MeshLayout, rank: int | None = None):
        if not dist.is_initialized():
            raise RuntimeError("ProcessMesh needs torch.distributed to be initialized (init_process_group)")
        world = dist.get_world_size()
        if world != layout.world_size:
            raise ParameterError("world_size", layout.world_size, str(world),
                                 f"The process group has {world} ranks.")
        self.layout = layout
        self.rank = dist.get_rank() if rank is None else rank
        self.coords = layout.coords(self.rank)
        for kind in KINDS:
            mine = None
            for ranks in getattr(layout, f"{kind}_groups")():
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    mine = (ranks, group)
            assert mine is not None
            setattr(self, f"{kind}_ranks", mine[0])
            setattr(self, f"{kind}_group", mine[1])
        self.ep: EPGroup = new_ep_groups(layout.ep_groups(), layout.ranks_per_node)

    def __repr__(self) -> str:
        lay = self.layout
        return (f"ProcessMesh(rank {self.rank} of {lay.world_size}: pp={lay.pp} dp={lay.dp} ep={lay.ep} "
                f"tp={lay.tp}, {lay.num_nodes} nodes x {lay.ranks_per_node}; {self.coords})")
