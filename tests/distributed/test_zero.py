"""ZeRO-1 as Megatron's distributed optimizer (train/zero.py) against one process's AdamW.

Four gloo ranks hold the same parameters, each with its own gradient; the reduce-scatter (the ring on gloo),
the shard update (FP32 masters, BF16 moments) and the all-gather must leave every rank with what
MasterAdamW (itself checked against torch.optim.AdamW) computes on one process from the mean gradient,
whichever way the buckets cut the parameters; and the ring reduce-scatter must equal all-reduce-then-slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from moetron.parallel.local import run_local

from moetron.config import OptimConfig
from moetron.train.optim import MasterAdamW
from moetron.train.zero import ShardGroup, ZeroAdamW, reduce_scatter

WORLD = 4
SHAPES = {"w": (7, 5), "experts": (3, 4, 2), "norm": (6,)}


def params(dtype=torch.float32) -> list[tuple[str, torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(0)
    return [(k, torch.nn.Parameter(torch.randn(s, generator=g).to(dtype))) for k, s in sorted(SHAPES.items())]


def grads(rank: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return {k: torch.randn(s, generator=g) for k, s in sorted(SHAPES.items())}


def _check(rank: int, world: int, bucket_numel: int, dtype) -> None:
    cfg = OptimConfig(lr=0.01, weight_decay=0.1)
    mine = params(dtype)
    optimizer = ZeroAdamW([ShardGroup(list(range(world)), dist.group.WORLD, mine, {"experts": 0})], cfg, rank,
                          bucket_numel=bucket_numel)
    reference = params()
    ref_opt = MasterAdamW(reference, cfg)
    for step in range(3):
        optimizer.zero_grad()
        for key, p in mine:
            p.main_grad.add_(grads(rank, step)[key])
        optimizer.reduce_gradients(world)
        optimizer.step()
        for key, p in reference:
            p.grad = sum(grads(r, step)[key] for r in range(world)) / world
        ref_opt.step()
    for (key, p), (_, want) in zip(mine, reference):
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(p.float(), want.detach(), **tol, msg=f"{key} on rank {rank}")
    # ring reduce-scatter == all-reduce, then this rank's quarter
    flat = torch.randn(4 * 5, generator=torch.Generator().manual_seed(rank))
    total = flat.clone()
    dist.all_reduce(total)
    out = torch.empty(5)
    reduce_scatter(out, flat, dist.group.WORLD)
    torch.testing.assert_close(out, total[5 * rank: 5 * rank + 5])


def test_sharded_update_equals_one_process_adamw_whatever_the_buckets():
    for bucket_numel in (1000, 30):  # one bucket; or a bucket per parameter, cutting none
        run_local(_check, WORLD, (bucket_numel, torch.float32), timeout=120)


def test_bf16_parameters_follow_the_fp32_masters():
    run_local(_check, WORLD, (1000, torch.bfloat16), timeout=120)
