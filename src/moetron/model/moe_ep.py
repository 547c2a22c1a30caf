"""Expert parallelism as a replaceable expert runner of `MoE` (applied from outside, as torchtitan does).

`shard_experts(moe, ep, ...)` keeps this rank's block of routed experts (`moe.experts` becomes a
GroupedExperts of experts_per_rank, `moe.expert_offset` its first global id) and swaps `moe.expert_runner`
for an `ExpertParallelRunner`: tokens travel to the ranks holding their experts by moetron.comm's
dispatch, run there, and come back by combine. Everything else -- the router, the shared experts, the
balance loss and the load statistics -- is `MoE.forward`'s own code, written once. Group-limited routing
uses groups = nodes of the EP group, so each token reaches at most topk_group nodes (arXiv 2412.19437
§2.1.2, §3.2).

State-dict keys stay the full model's; the stacked expert tensors have experts_per_rank rows, which a
checkpoint writer maps to global expert ids expert_offset + i. Expert loads for the bias update must be
summed over every rank that sees different tokens (the trainer's all-reduce of the step statistics).
"""

from __future__ import annotations

import torch
from torch import nn

from moetron.comm import CommStats, Dispatcher, EPGroup, Transport, run_local_experts
from moetron.config.errors import invalid
from moetron.model.moe import GroupedExperts, MoE, Routing


class ExpertParallelRunner:
    """Dispatch -> this rank's experts -> combine; started and finished by MoE.forward in place of
    run_experts (start_routed_experts)."""

    def __init__(self, dispatcher: Dispatcher, experts_per_rank: int):
        self.dispatcher, self.experts_per_rank = dispatcher, experts_per_rank

    def __call__(self, experts: nn.Module, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return self.start(experts, x, routing)()

    def start(self, experts: nn.Module, x: torch.Tensor, routing: Routing):
        """Issue the dispatch; returns the call that waits for it, runs the local experts and combines (its
        wait just before the consumer: comm/overlap.py hands over to the other chunk of a pair there)."""
        pending = self.dispatcher.dispatch_async(x, routing.experts, routing.gates)

        def finish() -> torch.Tensor:
            received = pending.wait()
            y = run_local_experts(experts, received.x, received.expert_ids, received.gates, self.experts_per_rank)
            return self.dispatcher.combine(y, received).to(x.dtype)

        return finish


def shard_experts(moe: MoE, ep: EPGroup, mode: str = "two_hop", fp8_dispatch: bool = False,
                  combine_dtype: torch.dtype | None = None, stats: CommStats | None = None,
                  transport: Transport | None = None) -> MoE:
    """Make `moe` (in place) hold only this EP rank's experts and route tokens over `ep`. A MoE on the
    meta device stays there (its block is built on meta, to materialize later)."""
    per_rank = ep.experts_per_rank(moe.num_experts)
    n_group = moe.gate.n_group
    if n_group > 1 and ep.num_nodes > 1 and n_group % ep.num_nodes:
        raise invalid("model.n_group", n_group, f"1 or a multiple of the EP group's node count ({ep.num_nodes})",
                      "Group-limited routing bounds the nodes a token reaches only when every expert group lies "
                      "inside one node.")
    full = moe.experts
    _, two_inter, hidden = full.gate_up_proj.shape
    offset = ep.rank * per_rank
    with torch.device(full.gate_up_proj.device):
        block = GroupedExperts(per_rank, hidden, two_inter // 2)
    with torch.no_grad():
        rows = slice(offset, offset + per_rank)
        block.gate_up_proj.copy_(full.gate_up_proj[rows])
        block.down_proj.copy_(full.down_proj[rows])
    moe.experts, moe.expert_offset = block, offset
    dispatcher = Dispatcher(ep, moe.num_experts, mode, fp8_dispatch, combine_dtype, stats, transport)
    moe.expert_runner = ExpertParallelRunner(dispatcher, per_rank)
    return moe


def apply_expert_parallel(model: nn.Module, ep: EPGroup, mode: str = "two_hop", fp8_dispatch: bool = False,
                          combine_dtype: torch.dtype | None = None, stats: CommStats | None = None,
                          transport: Transport | None = None) -> nn.Module:
    """Shard every MoE of `model` over `ep`; all of them count bytes into `stats` and talk through
    `transport` (each created if omitted, then shared)."""
    stats = stats if stats is not None else CommStats()
    transport = transport if transport is not None else Transport()
    for moe in model.modules():
        if isinstance(moe, MoE) and not isinstance(moe.expert_runner, ExpertParallelRunner):
            shard_experts(moe, ep, mode, fp8_dispatch, combine_dtype, stats, transport)
    return model
