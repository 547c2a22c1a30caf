"""The overlapped F&B pair runs its backward as B then W with FP8 on (4 gloo processes, 2 nodes x 2 ranks):
equal bit for bit to the sequential pair's one-pass backward, and each Wgrad GEMM runs once (before the
FP8 Functions computed both gradients in B, so B-then-W ran every Wgrad twice).

The stage is test_overlap's (a dense and two MoE blocks, expert parallelism over both nodes) converted to
FP8 like the trainer does: FP8 dispatch payload, FP8 Linears and FP8 grouped experts.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from helpers import small_model_config
from moetron.comm import Transport, world_ep_group
from moetron.comm.overlap import OverlappedForwardBackward, enable_overlap, sequential_forward_backward
from moetron.parallel.actions import Op
from moetron.parallel.local import run_local
from test_overlap import Stage, run_pair
from torch import nn

from moetron.fp8 import grouped, linear
from moetron.fp8.gemm import fp8_gemm
from moetron.fp8.grouped import FP8GroupedExperts
from moetron.model.block import Block
from moetron.model.moe_ep import apply_expert_parallel
from moetron.train.parallelize import apply_fp8


class WgradCounter:
    def __init__(self):
        self.wgrad = 0

    def __call__(self, *args, b_block=False, **kwargs):
        self.wgrad += not b_block  # Wgrad GEMMs have 1x128 scales on both operands
        return fp8_gemm(*args, b_block=b_block, **kwargs)


class FP8Stage(Stage):
    """test_overlap's stage with an FP8 dispatch payload and FP8 GEMMs."""

    def __init__(self, cfg, ep, transport: Transport):
        nn.Module.__init__(self)
        torch.manual_seed(0)
        self.cfg = cfg
        self.blocks = nn.ModuleList([Block(cfg, moe=False), Block(cfg, moe=True), Block(cfg, moe=True)])
        for p in self.parameters():
            nn.init.normal_(p, std=0.1)
        apply_expert_parallel(self, ep, "two_hop", fp8_dispatch=True, transport=transport)
        apply_fp8(self)


def run_checks(rank: int, world: int) -> None:
    counter = WgradCounter()
    linear.gemm_kernel = grouped.gemm_kernel = lambda backend, device: counter
    ep = world_ep_group(ranks_per_node=2)
    cfg = small_model_config(n_group=2, topk_group=1, num_hidden_layers=3)
    transport = Transport()
    enable_overlap(transport, ep, [list(range(world))], 2)
    stage = FP8Stage(cfg, ep, transport)
    assert sum(isinstance(m, FP8GroupedExperts) for m in stage.modules()) == 2
    for op in (Op.BW, Op.B):
        counter.wgrad = 0
        reference = run_pair(stage, sequential_forward_backward, op)
        once = counter.wgrad
        counter.wgrad = 0
        overlapped = run_pair(stage, OverlappedForwardBackward(transport, split_backward=True), op)
        assert counter.wgrad == once > 0, f"rank {rank} {op}: {counter.wgrad} Wgrad GEMMs, {once} unsplit"
        assert len(reference) == len(overlapped) > 10
        for i, (a, b) in enumerate(zip(reference, overlapped, strict=True)):
            assert torch.equal(a, b), f"rank {dist.get_rank()} {op}: tensor {i} differs"


def test_overlapped_pair_runs_b_then_w_with_fp8_bitwise():
    start = time.monotonic()
    run_local(run_checks, 4, timeout=300)
    assert time.monotonic() - start < 300
