"""The overlapped F&B pair really overlaps (2 gloo processes acting as 2 nodes): while a transfer of the
backward chunk is in flight, the forward chunk computes, and the forward issues its first transfer before
the backward has finished its last one. Bitwise equality with the sequential pair (test_overlap.py) cannot
see this: a pair that ran the backward to completion before the forward started gives the same numbers,
and fails here. Every transfer is held for at least 50 ms by the link model, so the windows are wide."""

from __future__ import annotations

import threading
import time

import torch.distributed as dist
from helpers import small_model_config
from moetron.comm import LinkModel, Recorder, Transport, world_ep_group
from moetron.comm.overlap import OverlappedForwardBackward, enable_overlap
from moetron.parallel.local import run_local
from test_overlap import Stage, run_pair

LATENCY_S = 0.05


def check_interleaving(rank: int, world: int) -> None:
    ep = world_ep_group(ranks_per_node=1)
    transport = Transport()
    enable_overlap(transport, ep, [list(range(world))], 1)
    stage = Stage(small_model_config(n_group=2, topk_group=1, num_hidden_layers=3), ep, "flat", transport)
    main = threading.get_ident()
    forward_calls: list[float] = []  # when the forward side (this thread) started a module
    hooks = [m.register_forward_pre_hook(
        lambda *_: forward_calls.append(time.perf_counter()) if threading.get_ident() == main else None)
        for m in stage.modules()]
    transport.link = LinkModel(ranks_per_node=1, latency_s=LATENCY_S)
    transport.recorder = recorder = Recorder()
    run_pair(stage, OverlappedForwardBackward(transport))
    for hook in hooks:
        hook.remove()

    spans = [s for s in recorder.spans if s.kind == "comm"]
    backward = [s for s in spans if s.role == "B" and s.what != "counts"]
    forward = [s for s in spans if s.role == "F" and s.what != "counts"]
    assert backward and forward, f"rank {rank}: both chunks of the pair transfer ({len(backward)}, {len(forward)})"
    covered = [s for s in backward if any(s.start < t < s.end for t in forward_calls)]
    assert covered, (
        f"rank {rank}: the forward computed during {len(covered)} of the backward's {len(backward)} transfers")
    assert min(s.start for s in forward) < max(s.end for s in backward), (
        f"rank {rank}: the forward issued no transfer before the backward's last one landed (serialized)")
    dist.barrier()


def test_forward_computes_while_backward_transfers_are_in_flight():
    run_local(check_interleaving, 2, timeout=180)
