"""moetron.comm: expert-parallel dispatch/combine with node-limited routing (arXiv 2412.19437 §3.2.2).

Flat (one all-to-all) or two-hop (across nodes on the rail, then inside the node) transport, FP8 wire
payloads, differentiable both ways, async handles for overlap, and byte counters. Knows nothing about
moetron's model: it takes tensors, expert ids, gates, process groups and plain nn.Modules.

    ep = world_ep_group(ranks_per_node=2)                  # or ProcessMesh(...).ep
    disp = Dispatcher(ep, num_experts=8, mode="two_hop")
    d = disp.dispatch(x, expert_ids, gates)                # rows for this rank's experts
    y = run_local_experts(my_experts, d.x, d.expert_ids, d.gates)
    out = disp.combine(y, d)                               # sum_k gate_k * expert_k(x) at home
"""

from .dispatch import MODES, Dispatched, Dispatcher
from .experts import run_local_experts
from .layout import EPGroup, local_size_of, new_ep_groups, node_slices, world_ep_group
from .link_model import LinkModel
from .payload import DispatchFormat
from .recorder import FlightRecorder, Recorder
from .stats import CommStats
from .transport import Pending, Route, Transport

__all__ = [
    "MODES", "CommStats", "DispatchFormat", "Dispatched", "Dispatcher", "EPGroup", "FlightRecorder", "LinkModel",
    "Pending", "Recorder", "Route", "Transport", "local_size_of", "new_ep_groups", "node_slices", "run_local_experts", "world_ep_group",
]
