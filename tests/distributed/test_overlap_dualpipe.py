"""DualPipe with expert parallelism through the pipeline executor: a step with overlapped F&B
(forward_backward=OverlappedForwardBackward(transport)) gives bitwise the losses and gradients of a step with the
executor's sequential F&B. 4 gloo processes as 2 nodes x 2 ranks: pipeline groups {0,1} and {2,3} (PP 2,
inside a node), EP groups {0,2} and {1,3} (across the nodes, two-hop dispatch), each stage one MoE block."""

from __future__ import annotations

import torch
import torch.distributed as dist
from helpers import small_model_config
from moetron.comm import Recorder, Transport, new_ep_groups
from moetron.comm.overlap import OverlappedForwardBackward, enable_overlap
from moetron.parallel.actions import FB
from moetron.parallel.executor import PipelineExecutor
from moetron.parallel.local import run_local
from moetron.parallel.schedules import build_schedule
from torch import nn

from moetron.model.block import Block
from moetron.model.moe_ep import apply_expert_parallel
from moetron.model.rope import rope_cos_sin

SEQ, CHUNKS = 4, 4


class Stage(nn.Module):
    def __init__(self, cfg, ep, stage: int, transport: Transport):
        super().__init__()
        torch.manual_seed(stage)
        self.cfg = cfg
        self.block = Block(cfg, moe=True)
        for p in self.block.parameters():
            nn.init.normal_(p, std=0.1)
        apply_expert_parallel(self, ep, "two_hop", transport=transport)

    def forward(self, h):
        cos, sin = rope_cos_sin(torch.arange(h.shape[1]), self.cfg.qk_rope_head_dim, self.cfg.rope_theta,
                                self.cfg.rope_scaling)
        return self.block(h, cos, sin)


def loss_fn(out, target):
    return ((out - target) ** 2).mean() / CHUNKS


def run(rank: int, world: int) -> None:
    pp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pp_group = pp_groups[rank // 2]
    partition = [[0, 2], [1, 3]]
    ep = new_ep_groups(partition, ranks_per_node=2)
    assert ep.num_nodes == 2
    transport = Transport()
    enable_overlap(transport, ep, partition, ranks_per_node=2)
    cfg = small_model_config(n_group=2, topk_group=1)
    schedule = build_schedule("dualpipe", 2, CHUNKS)
    me = dist.get_rank(pp_group)
    stages = {sid: Stage(cfg, ep, sid.stage, transport) for sid in schedule.stages_of(me)}
    g = torch.Generator().manual_seed(rank // 2)  # a data-parallel replica's batch
    inputs = torch.randn(2 * CHUNKS, SEQ, cfg.hidden_size, generator=g)
    targets = torch.randn(2 * CHUNKS, SEQ, cfg.hidden_size, generator=g)
    assert any(isinstance(step, FB) for step in schedule.steps[me])

    results = []
    for hook in (None, OverlappedForwardBackward(transport)):
        for module in stages.values():
            module.zero_grad(set_to_none=True)
        executor = PipelineExecutor(schedule, stages, loss_fn, group=pp_group, forward_backward=hook)
        rec = transport.recorder = Recorder()
        result = executor.step(inputs, targets)
        transport.recorder = None
        roles = {s.role for s in rec.spans}
        assert ("B" in roles) == (hook is not None), roles
        grads = [p.grad.clone() for m in stages.values() for p in m.parameters() if p.grad is not None]
        results.append(([x for x in result.losses if x is not None], grads))
    (ref_losses, ref_grads), (losses, grads) = results
    assert len(losses) == len(ref_losses) and len(grads) == len(ref_grads) > 10
    for a, b in zip(ref_losses + ref_grads, losses + grads):
        assert torch.equal(a, b), f"rank {rank}: overlapped DualPipe differs from sequential"


def test_dualpipe_ep_overlapped_equals_sequential():
    run_local(run, 4, timeout=300)
