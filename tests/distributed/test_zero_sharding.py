"""ZeRO-1 through ZeroAdamW itself (4 gloo processes): each rank steps, and holds optimizer state for, exactly
its own partition of the parameters (about 1/dp of them), and the replicated result equals one AdamW over
every parameter on one process, bitwise. A ZeroAdamW that steps every parameter on every rank fails here."""

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
    group = ShardGroup(list(range(world)), None, params)
    zero = ZeroAdamW([group], optim_config(), rank)
    for step in range(STEPS):
        set_grads(params, step)
        zero.step()

    # This rank owns exactly its partition (the greedy owners every member computes alike) ...
    owners = group.owners()
    mine = {key for (key, _), owner in zip(params, owners) if owner == rank}
    assert set(zero.owned) == mine, f"rank {rank} steps {sorted(zero.owned)}, its partition is {sorted(mine)}"
    # ... holds AdamW state for those parameters only ...
    stepped = {id(p) for p in zero.inner.state} if zero.inner is not None else set()
    assert stepped == {id(p) for k, p in params if k in mine}, f"rank {rank} holds state beyond its partition"
    # ... and the partitions cover every parameter once, each about 1/world of the elements.
    total = sum(p.numel() for _, p in params)
    held = torch.tensor([zero.shard_numel()])
    sizes = [torch.zeros(1, dtype=held.dtype) for _ in range(world)]
    dist.all_gather(sizes, held)
    assert sum(int(s) for s in sizes) == total
    assert max(int(s) for s in sizes) <= total / world + max(p.numel() for _, p in params)

    values, moments = reference()
    for key, p in params:
        assert torch.equal(p.detach(), values[key]), f"rank {rank}: {key} differs from one AdamW"
    for key in mine:
        assert torch.equal(zero.state_of(key)["exp_avg"], moments[key]), f"rank {rank}: moment of {key}"


def test_zero1_steps_only_the_own_partition_and_equals_one_adamw():
    run_local(check_rank, 4, timeout=120)
