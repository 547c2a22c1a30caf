"""Where the ranks of an expert-parallel (EP) group sit: nodes, local indices, and the three process
groups the dispatcher talks over.

EP rank e (its index in the sorted list of the group's global ranks) lives on EP node e // local_size
at local index e % local_size. Every node of the group holds the same number of EP ranks, so the
"rail" of local index l (the ranks with index l on every node) has one member per node. Experts are
placed in blocks: expert x lives on EP rank x // (num_experts / size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from moetron.comm.errors import ParameterError


def node_slices(ranks: list[int], ranks_per_node: int) -> list[list[int]]:
    """The group's (sorted) global ranks cut by node: node of global rank g is g // ranks_per_node."""
    slices: dict[int, list[int]] = {}
    for rank in sorted(ranks):
        slices.setdefault(rank // ranks_per_node, []).append(rank)
    return list(slices.values())


def local_size_of(ranks: list[int], ranks_per_node: int) -> int:
    """EP ranks per node of the group; raises ParameterError unless every node holds the same number."""
    if ranks_per_node < 1:
        raise ParameterError("ranks_per_node", ranks_per_node, "a positive integer")
    sizes = sorted({len(s) for s in node_slices(ranks, ranks_per_node)})
    if len(sizes) != 1:
        raise ParameterError(
            "ep", len(ranks),
            "an EP size that divides ranks_per_node, or a multiple of it with groups aligned to node boundaries",
            f"The expert-parallel group of global ranks {sorted(ranks)} covers its nodes unevenly (ranks per "
            f"node: {sizes}) with ranks_per_node = {ranks_per_node}; two-hop dispatch needs the same number of "
            "EP ranks on every node.")
    return sizes[0]


@dataclass
class EPGroup:
    """One expert-parallel group as seen from one of its members.

    `group` spans all EP ranks; `rail` the members with my local index (one per node, group rank = node);
    `intra` the members on my node (group rank = local index). A group of None means "the default group"
    for `group` and "no communication needed" (a single member) for `rail` / `intra`."""

    ranks: tuple[int, ...]  # sorted global ranks; EP rank = index
    rank: int  # my EP rank
    local_size: int  # EP ranks per node
    group: dist.ProcessGroup | None = None
    rail: dist.ProcessGroup | None = None
    intra: dist.ProcessGroup | None = None

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def num_nodes(self) -> int:
        return self.size // self.local_size

    @property
    def node(self) -> int:
        return self.rank // self.local_size

    @property
    def local(self) -> int:
        return self.rank % self.local_size

    def node_of(self, ep_rank: int) -> int:
        return ep_rank // self.local_size

    def rail_ranks(self, local: int | None = None) -> list[int]:
        """EP ranks with local index `local` (mine by default), in node order."""
        local = self.local if local is None else local
        return [n * self.local_size + local for n in range(self.num_nodes)]

    def intra_ranks(self, node: int | None = None) -> list[int]:
        """EP ranks on node `node` (mine by default), in local order."""
        node = self.node if node is None else node
        return list(range(node * self.local_size, (node + 1) * self.local_size))

    def experts_per_rank(self, num_experts: int) -> int:
        if num_experts % self.size:
            raise ParameterError("num_experts", num_experts,
                                 f"a multiple of the expert-parallel size ep = {self.size}",
                                 "Experts are sharded in equal blocks over the EP ranks.")
        return num_experts // self.size


def new_ep_groups(partition: list[list[int]], ranks_per_node: int) -> EPGroup | None:
    """Create the EP, rail and intra-node process groups of every EP group in `partition` (lists of global
    ranks covering the world). COLLECTIVE: every rank of the default group must call it with the same
    arguments. Returns this rank's EPGroup (None if it is in no group)."""
    me = dist.get_rank()
    sizes = {len(ranks) for ranks in partition}
    if len(sizes) != 1:
        raise ParameterError("ep", sorted(sizes), "expert-parallel groups of one size")
    mine = None
    for ranks in partition:
        ranks = sorted(ranks)
        local_size = local_size_of(ranks, ranks_per_node)
        num_nodes = len(ranks) // local_size
        whole = dist.new_group(ranks)
        rails = [dist.new_group([ranks[n * local_size + lo] for n in range(num_nodes)]) if num_nodes > 1 else None
                 for lo in range(local_size)]
        intras = [dist.new_group(ranks[n * local_size:(n + 1) * local_size]) if local_size > 1 else None
                  for n in range(num_nodes)]
        if me in ranks:
            e = ranks.index(me)
            mine = EPGroup(tuple(ranks), e, local_size, whole, rails[e % local_size], intras[e // local_size])
    return mine


def world_ep_group(ranks_per_node: int) -> EPGroup:
    """The whole world as one EP group (collective): the usual test and benchmark layout."""
    group = new_ep_groups([list(range(dist.get_world_size()))], ranks_per_node)
    assert group is not None
    return group
