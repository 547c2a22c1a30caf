"""Evaluation through the pipeline: `step(..., forward_only=True)` runs only the forwards.

On 2 gloo ranks, for 1F1B, ZB1P, DualPipe and DualPipeV, every rank compares the losses it holds with a
single-process forward of the same stages on the same micro-batches (bit for bit), and checks that each
forward ran once under no_grad and that no gradient and no chunk is left behind. A training step follows on the same executor (its losses are the
same forwards, so they must match too: the evaluation left the transfers in a clean state), then a
second evaluation, and one of a smaller batch (new activation shapes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from moetron.parallel import PipelineExecutor, actions_of, build_schedule
from moetron.parallel.local import run_local
from test_pipeline_executor import build_stage, make_batch, make_loss


def reference_losses(schedule, inputs, targets) -> list[torch.Tensor]:
    stages = [build_stage(s, schedule.num_stages) for s in range(schedule.num_stages)]
    loss_fn = make_loss(schedule.num_microbatches)
    losses = []
    with torch.no_grad():
        for x, y in zip(torch.tensor_split(inputs, schedule.num_microbatches),
                        torch.tensor_split(targets, schedule.num_microbatches)):
            for stage in stages:
                x = stage(x)
            losses.append(loss_fn(x, y))
    return losses


def check_losses(where: str, schedule, rank: int, losses, ref) -> None:
    for m, loss in enumerate(losses):
        last = schedule.rank_of(schedule.num_stages - 1, schedule.directions[m]) == rank
        assert (loss is not None) == last, f"{where}: loss of micro-batch {m} on the wrong rank"
        if loss is not None:
            assert torch.equal(loss, ref[m]), f"{where}: loss {m} {loss} != {ref[m]}"


def run_case(name: str, chunks: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    schedule = build_schedule(name, world, chunks)
    stages = {sid: build_stage(sid.stage, schedule.num_stages) for sid in schedule.stages_of(rank)}
    inputs, targets = make_batch(chunks)
    ref = reference_losses(schedule, inputs, targets)
    executor = PipelineExecutor(schedule, stages, make_loss(chunks))
    where = f"{name} forward-only with {world} ranks, {chunks} micro-batches, rank {rank}"
    grad_modes: list[bool] = []
    for module in stages.values():
        module.register_forward_pre_hook(lambda mod, args: grad_modes.append(torch.is_grad_enabled()))

    result = executor.step(inputs, targets, forward_only=True)
    forwards = sum(a.op.value == "F" for st in schedule.steps[rank] for a in actions_of(st))
    assert grad_modes == [False] * forwards, f"{where}: forwards under grad modes {grad_modes}, not {forwards} x no_grad"
    check_losses(where, schedule, rank, result.losses, ref)
    assert all(loss is None or not loss.requires_grad for loss in result.losses), f"{where}: loss has a graph"
    grads = [p.grad for m in stages.values() for p in m.parameters()]
    assert all(g is None for g in grads), f"{where}: evaluation left gradients"
    assert not executor._chunks and not len(executor.weight_grads), f"{where}: evaluation left chunks"
    assert result.peak_live_chunks == 0, f"{where}: evaluation held {result.peak_live_chunks} chunks"

    trained = executor.step(inputs, targets)  # then a training step on the same executor
    check_losses(f"{where} (training step after it)", schedule, rank, trained.losses, ref)
    before = [p.grad.clone() for m in stages.values() for p in m.parameters()]
    again = executor.step(inputs, targets, forward_only=True)
    check_losses(f"{where} (second evaluation)", schedule, rank, again.losses, ref)
    after = [p.grad for m in stages.values() for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), f"{where}: evaluation changed .grad"

    rows = 4 * chunks  # other micro-batch shapes: the executor learns their activation shapes anew
    small = executor.step(inputs[:rows], targets[:rows], forward_only=True)
    check_losses(f"{where} (smaller batch)", schedule, rank, small.losses,
                 reference_losses(schedule, inputs[:rows], targets[:rows]))


def run_cases(rank: int, world: int, cases: list[tuple]) -> None:
    for case in cases:
        run_case(*case)
        dist.barrier()


def test_two_ranks_forward_only_every_schedule():
    run_local(run_cases, 2, args=([("1f1b", 4), ("zb1p", 5), ("dualpipe", 4), ("dualpipev", 5)],), timeout=180)
