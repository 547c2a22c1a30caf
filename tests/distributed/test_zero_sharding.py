"""ZeRO-1 through ZeroAdamW itself (4 gloo processes): each rank holds optimizer state (masters, moments) for
exactly its own shard of the flattened parameters (1/dp of the elements), its moments equal one AdamW's for
those elements, and the all-gathered result equals one AdamW over every parameter on one process. A
ZeroAdamW that keeps or steps every element on every rank fails here."""

from __future__ import annotations

import torch
import torch.distributed as dist
from moetron.parallel.local import run_local
from torch import nn

from moetron.config import OptimConfig
from moetron.train.optim import MasterAdamW
from moetron.train.zero import ShardGroup, ZeroAdamW

STEPS = 3


def named_params() -> list[tuple[str, nn.Parameter]]:
    """The same parameters on every rank, of uneven sizes (so the partition is not trivially even)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(40, 16), nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8),
                          nn.Linear(8, 8, bias=False))
    return list(model.named_parameters())


def set_grads(params, step: int) -> None:
    """Gradients as the trainer hands them over: already averaged, so the same on every rank."""
    g = torch.Generator().manual_seed(100 + step)
    for _, p in params:
        p.grad = torch.randn(p.shape, generator=g)


def optim_config() -> OptimConfig:
    return OptimConfig(lr=1e-2, weight_decay=0.1, moment_dtype="float32")


def reference() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One AdamW over every parameter, in one process: final values and first moments by name."""
    params = named_params()
    opt = MasterAdamW(params, optim_config())
    for step in range(STEPS):
        set_grads(params, step)
        opt.step()
    return ({k: p.detach().clone() for k, p in params}, {k: opt.state[p]["exp_avg"].clone() for k, p in params})


def check_rank(rank: int, world: int) -> None:
    params = named_params()
    zero = ZeroAdamW([ShardGroup(list(range(world)), dist.group.WORLD, params)], optim_config(), rank)
    for step in range(STEPS):
        zero.zero_grad()
        set_grads(params, step)
        for _, p in params:  # what the trainer's hook does after each backward
            p.main_grad.add_(p.grad)
            p.grad = None
        zero.reduce_gradients(world)  # the mean of equal gradients
        zero.step()

    # This rank holds masters and moments for its shard only: 1/world of the elements ...
    total = sum(p.numel() for _, p in params)
    assert sum(b.exp_avg.numel() for b in zero.buckets) == -(-total // world)
    assert sum(b.master.numel() for b in zero.buckets) == -(-total // world)
    # ... whose moments are one AdamW's for those elements, and every rank ends with one AdamW's values.
    values, moments = reference()
    for bucket in zero.buckets:
        for piece in bucket.pieces():
            want = moments[piece.key].reshape(-1)[piece.offset: piece.offset + piece.stop - piece.start]
            torch.testing.assert_close(bucket.exp_avg[piece.start: piece.stop], want, rtol=1e-6, atol=1e-9)
    for key, p in params:
        torch.testing.assert_close(p.detach(), values[key], rtol=1e-6, atol=1e-8, msg=f"rank {rank}: {key}")


def test_zero1_holds_only_its_shard_and_equals_one_adamw():
    run_local(check_rank, 4, timeout=120)
