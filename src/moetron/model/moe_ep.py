"""DeepSeekMoE with expert parallelism: the routed experts of a `MoE` sharded in blocks over an EP group,
tokens moved by moetron.comm's dispatch/combine; the router and the shared experts stay local (every
rank runs them on its own tokens). Group-limited routing uses groups = nodes of the EP group, so each
token reaches at most topk_group nodes.

It is a `MoE` (isinstance holds, so Transformer.moe_layers and the trainer's bias update find it) with
the same statistics buffers; only `experts` holds this rank's block (state_dict keys as in MoE, shapes
[experts_per_rank, ...]: a checkpoint writer must map them to global expert ids, expert_offset + i).
A MoE on the "meta" device gives an EP layer on "meta" (to_empty + init afterwards), so a large model
never materializes every expert on every rank. Loads for the bias update must be
summed over every rank that sees different tokens: `global_load(group)` does that all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moetron.comm import CommStats, Dispatcher, EPGroup, Transport, run_local_experts
from moetron.config.errors import invalid
from moetron.model.moe import GroupedExperts, MoE, Routing, _AttachAuxLoss, sequence_balance_loss


class ExpertParallelMoE(MoE):
    def __init__(self, moe: MoE, ep: EPGroup, mode: str = "two_hop", fp8_dispatch: bool = False,
                 combine_dtype: torch.dtype | None = None, stats: CommStats | None = None,
                 transport: Transport | None = None):
        nn.Module.__init__(self)  # built from an existing MoE, not from a config
        num_experts = moe.num_experts
        per_rank = ep.experts_per_rank(num_experts)
        n_group = moe.gate.n_group
        if n_group > 1 and ep.num_nodes > 1 and n_group % ep.num_nodes:
            raise invalid("model.n_group", n_group,
                          f"1 or a multiple of the EP group's node count ({ep.num_nodes})",
                          "Group-limited routing bounds the nodes a token reaches only when every expert "
                          "group lies inside one node.")
        self.num_experts, self.alpha, self.aux_loss_scale = num_experts, moe.alpha, moe.aux_loss_scale
        self.ep, self.experts_per_rank = ep, per_rank
        self.expert_offset = ep.rank * per_rank
        self.gate = moe.gate
        self.shared_experts = moe.shared_experts
        full = moe.experts
        _, two_inter, hidden = full.gate_up_proj.shape
        with torch.device(full.gate_up_proj.device):  # "meta" too: build big models without materializing
            self.experts = GroupedExperts(per_rank, hidden, two_inter // 2)
        with torch.no_grad():
            block = slice(self.expert_offset, self.expert_offset + per_rank)
            self.experts.gate_up_proj.copy_(full.gate_up_proj[block])
            self.experts.down_proj.copy_(full.down_proj[block])
        self.dispatcher = Dispatcher(ep, num_experts, mode, fp8_dispatch, combine_dtype, stats, transport)
        device = moe.tokens_per_expert.device
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, device=device), persistent=False)
        self.register_buffer("balance_loss_sum", torch.zeros((), device=device), persistent=False)
        self.register_buffer("forward_count", torch.zeros((), device=device), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = h.shape
        x = h.reshape(-1, hidden)
        routing = self.gate(x) if x.shape[0] else self._no_routing(x)
        received = self.dispatcher.dispatch(x, routing.experts, routing.gates)
        y = run_local_experts(self.experts, received.x, received.expert_ids, received.gates, self.experts_per_rank)
        out = self.dispatcher.combine(y, received).to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        out = out.view(batch, seq, hidden)
        if self.training and torch.is_grad_enabled():
            self._record(routing)
            if self.alpha > 0 and batch > 0:
                experts = routing.experts.view(batch, seq, -1)
                bal = sequence_balance_loss(routing.scores.view(batch, seq, -1), experts, self.num_experts, self.alpha)
                self.balance_loss_sum += bal.detach()
                out = _AttachAuxLoss.apply(out, bal, self.aux_loss_scale)
        return out

    def _no_routing(self, x: torch.Tensor) -> Routing:
        """A rank without tokens still takes part in the collectives (the Router cannot view 0 rows)."""
        top_k = self.gate.top_k
        scores = x.new_zeros(0, self.num_experts, dtype=torch.float32) + 0 * self.gate.weight.sum()
        return Routing(scores, torch.zeros(0, top_k, dtype=torch.long, device=x.device), scores[:, :top_k])

    @torch.no_grad()
    def global_load(self, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """tokens_per_expert summed over `group`: every rank that sees different tokens (the data-parallel
        group of this pipeline stage, which contains the EP group). Collective over `group`."""
        load = self.tokens_per_expert.clone()
        dist.all_reduce(load, group=group)
        return load


def apply_expert_parallel(model: nn.Module, ep: EPGroup, mode: str = "two_hop", fp8_dispatch: bool = False,
                          combine_dtype: torch.dtype | None = None, stats: CommStats | None = None,
                          transport: Transport | None = None) -> nn.Module:
    """Replace every MoE in `model` (in place) by an ExpertParallelMoE holding this rank's experts; all of
    them count bytes into `stats` and talk through `transport` (each created if omitted)."""
    stats = stats if stats is not None else CommStats()
    transport = transport if transport is not None else Transport()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoE) and not isinstance(child, ExpertParallelMoE):
                setattr(parent, name, ExpertParallelMoE(child, ep, mode, fp8_dispatch, combine_dtype, stats,
                                                                transport))
    return model
