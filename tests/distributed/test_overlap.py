"""Overlapped F&B equals sequential F&B bit for bit (4 gloo processes acting as 2 nodes x 2 ranks).

A stage of two Transformer blocks (one dense, one MoE with expert parallelism over both nodes) plus a
loss: micro-batch 0 runs forward, then the pair (forward of micro-batch 1, backward of micro-batch 0) runs
sequentially and overlapped, from the same parameters. Losses, input gradients and every parameter
gradient are torch.equal. Checked for flat and two-hop dispatch, with and without the link model, for a
B-only backward (W left to the WeightGradStore), and that a missing twin group fails with a clear error.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.distributed as dist
from helpers import small_model_config
from moetron.comm import LinkModel, Recorder, Transport, world_ep_group
from moetron.comm.overlap import OverlappedForwardBackward, enable_overlap, sequential_forward_backward
from moetron.parallel.actions import Action, Op
from moetron.parallel.executor import BackwardJob, ForwardJob
from moetron.parallel.local import run_local
from moetron.parallel.weight_grad import ChunkBackward
from torch import nn

from moetron.model.block import Block
from moetron.model.moe_ep import apply_expert_parallel
from moetron.model.rope import rope_cos_sin

SEQ = 4


class Stage(nn.Module):
    """Blocks as one pipeline stage (one tensor in, one out)."""

    def __init__(self, cfg, ep, mode: str, transport: Transport):
        super().__init__()
        torch.manual_seed(0)
        self.cfg = cfg
        self.blocks = nn.ModuleList([Block(cfg, moe=False), Block(cfg, moe=True), Block(cfg, moe=True)])
        for p in self.parameters():
            nn.init.normal_(p, std=0.1)
        apply_expert_parallel(self, ep, mode, transport=transport)

    def forward(self, h):
        cos, sin = rope_cos_sin(torch.arange(h.shape[1]), self.cfg.qk_rope_head_dim, self.cfg.rope_theta,
                                self.cfg.rope_scaling)
        for block in self.blocks:
            h = block(h, cos, sin)
        return h


def loss_fn(out, target):
    return ((out - target) ** 2).mean()


def micro_batch(i: int, hidden: int):
    g = torch.Generator().manual_seed(1000 * dist.get_rank() + i)
    return torch.randn(2, SEQ, hidden, generator=g), torch.randn(2, SEQ, hidden, generator=g)


def run_pair(stage, hook, op=Op.BW):
    """Forward micro-batch 0, then the pair (F of micro-batch 1, B of micro-batch 0) through `hook`."""
    stage.zero_grad(set_to_none=True)
    x0, t0 = micro_batch(0, stage.cfg.hidden_size)
    x1, t1 = micro_batch(1, stage.cfg.hidden_size)
    x0 = x0.requires_grad_()
    loss0 = loss_fn(stage(x0), t0)
    backward = ChunkBackward(torch.autograd.graph.get_gradient_edge(loss0), torch.ones_like(loss0), [x0])
    if op == Op.B:  # a B-only chunk: input gradients now, W later
        job_b = BackwardJob(Action(op, 0, 0), stage, backward)
        job_b.run = backward.inputs_only
    else:
        job_b = BackwardJob(Action(op, 0, 0), stage, backward)
    x1 = x1.requires_grad_()
    job_f = ForwardJob(Action(Op.F, 1, 0), stage, x1, loss_fn, t1)
    loss1, grads = hook(job_f, job_b)
    if op == Op.B:
        backward.weights()
    loss1.backward()  # the forward's graph is whole: its backward works as usual
    return ([loss0.detach(), loss1.detach(), grads[0], x1.grad]
            + [p.grad.clone() for p in stage.parameters() if p.grad is not None])


def check(stage, transport, name, op=Op.BW):
    reference = run_pair(stage, sequential_forward_backward, op)
    overlapped = run_pair(stage, OverlappedForwardBackward(transport), op)
    assert len(reference) == len(overlapped) > 10, name
    for i, (a, b) in enumerate(zip(reference, overlapped)):
        assert torch.equal(a, b), f"rank {dist.get_rank()} {name}: tensor {i} differs"


def run_checks(rank: int, world: int) -> None:
    ep = world_ep_group(ranks_per_node=2)
    partition = [list(range(world))]
    cfg = small_model_config(n_group=2, topk_group=1, num_hidden_layers=3)

    # Without twins the backward side refuses to share the forward side's groups.
    transport = Transport()
    stage = Stage(cfg, ep, "flat", transport)
    with pytest.raises(RuntimeError, match="twin"):
        run_pair(stage, OverlappedForwardBackward(transport))
    assert transport.pair is None  # the failed pair left nothing behind
    dist.barrier()

    twin = enable_overlap(transport, ep, partition, 2)
    assert twin.ranks == ep.ranks and twin.group is not ep.group
    for mode in ("flat", "two_hop"):
        stage = Stage(cfg, ep, mode, transport)
        check(stage, transport, mode)
        check(stage, transport, f"{mode} B-only", Op.B)
    cfg4 = small_model_config(n_group=4, topk_group=2, num_hidden_layers=3)
    stage = Stage(cfg4, ep, "two_hop", transport)
    link = LinkModel(ranks_per_node=2, scale=2e-5, latency_s=1e-4)
    transport.link, transport.recorder = link, Recorder()
    check(stage, transport, "two_hop, link model, M=2")
    rec, transport.link, transport.recorder = transport.recorder, None, None
    assert link.transfers > 0
    roles = {s.role for s in rec.spans}
    assert {"F", "B", "-"} <= roles, roles  # both sides of the pair communicated, and the reference
    threads = {t.name for t in threading.enumerate()}
    assert "moetron-fb-backward" not in threads


def test_overlapped_equals_sequential_bitwise():
    start = time.monotonic()
    run_local(run_checks, 4, timeout=240)
    assert time.monotonic() - start < 240
