"""Overlapped F&B on a model of a GPU's streams (comm/stream_model.py): the order in which the pair's work
reaches one compute stream and one communication stream, replayed with the compute model's kernel costs and
the link model's transfer times. 4 gloo processes as 2 nodes x 2 ranks, a stage of one dense and two MoE
blocks with two-hop expert parallelism.

On a GPU a wait for a transfer stops the compute stream, not the host: if one side enqueues its wait and
the other side's kernels come after it, the two chunks are serialized behind the transfer. No rank may show
such a crossing, and the replayed pair must hide most of its communication (the sequential pair hides none).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from helpers import small_model_config
from moetron.comm import LinkModel, Transport, world_ep_group
from moetron.comm.compute_model import ComputeModel
from moetron.comm.overlap import OverlappedForwardBackward, enable_overlap, sequential_forward_backward
from moetron.comm.stream_model import StreamRecorder, crossings, replay
from moetron.parallel.actions import Action, Op
from moetron.parallel.executor import BackwardJob, ForwardJob
from moetron.parallel.local import run_local
from moetron.parallel.weight_grad import ChunkBackward
from test_overlap import Stage, loss_fn

from moetron.model.attention import MLA

SEQ, COMM_RATIO = 8, 2 / 3


def attention_core_flops(module, inputs, output) -> float:
    batch, seq = output.shape[:2]
    return 2.0 * batch * module.n_heads * seq * seq * (module.nope_dim + module.rope_dim + module.v_dim) / 2


def record_pair(stage, hook, streams: StreamRecorder, name: str, step: int) -> None:
    """Forward micro-batch b, then the pair (forward of a, backward of b) through `hook`, recorded as `name`."""
    g = torch.Generator().manual_seed(1000 * dist.get_rank() + step)
    shape = (2, SEQ, stage.cfg.hidden_size)
    x_b, t_b, x_a, t_a = (torch.randn(shape, generator=g) for _ in range(4))
    x_b.requires_grad_()
    loss_b = loss_fn(stage(x_b), t_b)
    backward = BackwardJob(Action(Op.BW, 0, 0), stage, ChunkBackward(
        torch.autograd.graph.get_gradient_edge(loss_b), torch.ones_like(loss_b), [x_b]))
    forward = ForwardJob(Action(Op.F, 1, 0), stage, x_a.requires_grad_(), loss_fn, t_a)
    streams.mark(f"{name} start")
    hook(forward, backward)
    streams.mark(f"{name} end")
    stage.zero_grad(set_to_none=True)


def run(rank: int, world: int) -> None:
    ep = world_ep_group(ranks_per_node=2)
    transport = Transport()
    enable_overlap(transport, ep, [list(range(world))], 2)
    stage = Stage(small_model_config(n_group=2, topk_group=1, num_hidden_layers=3), ep, "two_hop", transport)
    streams = StreamRecorder(LinkModel(ranks_per_node=2, latency_s=0.0))
    compute = ComputeModel(flops_per_s=1e9, extra_flops={MLA: attention_core_flops}, sleep=lambda s: None,
                           streams=streams)
    compute.attach(stage)
    transport.streams = streams
    record_pair(stage, sequential_forward_backward, streams, "sequential", 0)
    record_pair(stage, OverlappedForwardBackward(transport), streams, "overlapped", 1)
    # Links scaled so that the pair's communication takes COMM_RATIO x its compute (as benchmarks/overlap.py).
    unit = replay(streams.segment("sequential"), streams)
    link = LinkModel(ranks_per_node=2, latency_s=0.0, scale=unit.comm / (COMM_RATIO * unit.compute))
    sequential = replay(streams.segment("sequential"), streams, link)
    overlapped = replay(streams.segment("overlapped"), streams, link)
    print(f"rank {rank}: stream-model efficiency sequential {sequential.efficiency:.3f}, overlapped "
          f"{overlapped.efficiency:.3f}", flush=True)
    crossed = crossings(streams.segment("overlapped"), streams, link)
    assert not crossed, (f"rank {rank}: one side's compute queues behind the other side's wait: "
                         + "; ".join(f"{c.next_side} waits on {c.side}'s {c.what} ({1e6 * c.seconds:.0f} us)"
                                     for c in crossed))
    assert sequential.efficiency < 0.1, sequential
    assert overlapped.efficiency > 0.6, (rank, overlapped.efficiency)


def test_overlapped_pair_holds_on_modelled_streams():
    run_local(run, 4, timeout=240)
