"""The two hops of node-limited dispatch (arXiv 2412.19437 §3.2.2, DeepEP's idea).

Hop 1, over the rail: a token crosses to each node that holds any of its experts ONCE, landing on the
rank with the sender's own local index there (its rail peer). Hop 2, inside that node: the rail peer
forwards it to every local rank holding one of its experts (deduplicated per rank). The reverse (combine)
sums a token's expert rows inside the node first, so it crosses back between nodes once per node too.
"""

from __future__ import annotations

import torch

from .layout import EPGroup
from .transport import Hop, Transport, choice_mask, make_hop


def rail_hop(transport: Transport, ep: EPGroup, dest: torch.Tensor) -> Hop:
    """Hop 1 from the home rank. dest [T, K]: EP rank of every choice. Rail member n = node n."""
    remote = [n != ep.node for n in range(ep.num_nodes)]
    return make_hop(transport, ep.rail, ep.node, remote, choice_mask(dest // ep.local_size, ep.num_nodes))


def intra_node_hop(transport: Transport, ep: EPGroup, dest: torch.Tensor) -> Hop:
    """Hop 2 at the rail peer. dest [N, K]: EP rank of every choice of the rows hop 1 delivered; only the
    choices on this node are forwarded (the others are served by other nodes' copies of the row)."""
    here = dest // ep.local_size == ep.node
    target = torch.where(here, dest % ep.local_size, -1)
    return make_hop(transport, ep.intra, ep.local, [False] * ep.local_size, choice_mask(target, ep.local_size))
