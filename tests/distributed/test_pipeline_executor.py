"""Every schedule, run over gloo by PipelineExecutor, matches a single-process run bitwise.

Three spawns (2, 3 and 4 ranks) each run several schedules on one process group. The model is a
stack of small stages (embedding, Linear, RMSNorm-like scaling, a grouped expert GEMM via
torch._grouped_mm, Linear); every rank also runs the whole stack in one process on the same
micro-batches and compares its own stages' parameter gradients and its losses bit for bit. The
reference sums the per-micro-batch gradients of each stage copy in the order the schedule applies
them (its BW and W actions), and DualPipe's two copies as direction 0 + direction 1, because float
addition is not associative; everything else is the same arithmetic.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from moetron.parallel import (
    FB,
    Op,
    PipelineExecutor,
    StageId,
    actions_of,
    build_schedule,
    peak_activations,
    sequential_forward_backward,
)
from moetron.parallel.local import run_local
from torch import nn

DIM, VOCAB, EXPERTS, MICROBATCH_ROWS = 8, 16, 2, 6


class GroupedExperts(nn.Module):
    """A toy expert layer: rows split into EXPERTS contiguous groups, one GEMM per group."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(EXPERTS, DIM, DIM) / DIM**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        offs = torch.tensor([rows // 2, rows], dtype=torch.int32, device=x.device)
        return torch._grouped_mm(x, self.weight.transpose(-2, -1), offs=offs)


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = Scale()
        self.up = nn.Linear(DIM, DIM)
        self.experts = GroupedExperts()
        self.down = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.up(self.norm(x)))
        return x + self.down(torch.tanh(self.experts(h)))


class Stage(nn.Sequential):
    """A stage type with its own F&B hook (as the overlap work will add); it counts its calls."""

    pairs = 0

    @staticmethod
    def overlapped_forward_backward(forward, backward):
        forward.module.pairs += 1  # an instance attribute from here on
        return sequential_forward_backward(forward, backward)


def build_stage(stage: int, num_stages: int) -> nn.Module:
    torch.manual_seed(1000 + stage)
    layers: list[nn.Module] = [nn.Embedding(VOCAB, DIM)] if stage == 0 else []
    layers.append(Block())
    if stage == num_stages - 1:
        layers.append(nn.Linear(DIM, 3))
    return Stage(*layers)


def make_loss(num_microbatches: int):
    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(out, target) / num_microbatches

    return loss_fn


def make_batch(num_microbatches: int):
    g = torch.Generator().manual_seed(7)
    rows = num_microbatches * MICROBATCH_ROWS
    return torch.randint(0, VOCAB, (rows,), generator=g), torch.randn(rows, 3, generator=g)


def grad_order(schedule, sid: StageId) -> list[int]:
    """Micro-batches in the order their weight gradients land in stage copy `sid`."""
    rank = schedule.placement[sid]
    return [a.microbatch for s in schedule.steps[rank] for a in actions_of(s)
            if a.stage_id == sid and a.op in (Op.BW, Op.W)]


def reference(schedule, inputs, targets, steps):
    """Single process: per-micro-batch losses and, per stage, the summed gradients after `steps`
    identical steps (a step's gradients add onto the earlier ones)."""
    stages = [build_stage(s, schedule.num_stages) for s in range(schedule.num_stages)]
    loss_fn = make_loss(schedule.num_microbatches)
    xs = torch.tensor_split(inputs, schedule.num_microbatches)
    ys = torch.tensor_split(targets, schedule.num_microbatches)
    losses, per_mb = [], []
    for x, y in zip(xs, ys):
        for stage in stages:
            x = stage(x)
        loss = loss_fn(x, y)
        losses.append(loss.detach())
        params = [p for stage in stages for p in stage.parameters()]
        per_mb.append(dict(zip(map(id, params), torch.autograd.grad(loss, params))))

    def add(acc, g):
        return g if acc is None else [a + b for a, b in zip(acc, g)]

    grads = {}
    for s, stage in enumerate(stages):
        copies = sorted(sid for sid in schedule.placement if sid.stage == s)
        mb_grads = {m: [per_mb[m][id(p)] for p in stage.parameters()] for m in range(len(xs))}
        total = None
        if len(copies) == 1:  # one copy: every W adds onto .grad, step after step
            for _ in range(steps):
                for m in grad_order(schedule, copies[0]):
                    total = add(total, mb_grads[m])
        else:  # DualPipe: per step, direction 0 + direction 1, then onto the earlier steps
            for _ in range(steps):
                step_total = None
                for sid in copies:
                    copy = None
                    for m in grad_order(schedule, sid):
                        copy = add(copy, mb_grads[m])
                    step_total = add(step_total, copy)
                total = step_total if total is None else add(total, step_total)
        grads[s] = total
    return losses, grads


def run_case(name: str, chunks: int, steps: int = 1) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    schedule = build_schedule(name, world, chunks)
    stages = {sid: build_stage(sid.stage, schedule.num_stages) for sid in schedule.stages_of(rank)}
    inputs, targets = make_batch(chunks)
    executor = PipelineExecutor(schedule, stages, make_loss(chunks))
    for _ in range(steps):  # a second step adds its gradients onto the first's
        result = executor.step(inputs, targets)
    ref_losses, ref_grads = reference(schedule, inputs, targets, steps)
    where = f"{name} with {world} ranks, {chunks} micro-batches, {steps} step(s), rank {rank}"
    for m, loss in enumerate(result.losses):
        last = schedule.rank_of(schedule.num_stages - 1, schedule.directions[m]) == rank
        assert (loss is not None) == last, f"{where}: loss of micro-batch {m} on the wrong rank"
        if loss is not None:
            assert torch.equal(loss, ref_losses[m]), f"{where}: loss {m} {loss} != {ref_losses[m]}"
    for sid, module in stages.items():
        for (pname, p), ref in zip(module.named_parameters(), ref_grads[sid.stage]):
            assert p.grad is not None, f"{where}: no gradient for stage {sid} {pname}"
            assert torch.equal(p.grad, ref), (
                f"{where}: stage {tuple(sid)} {pname} gradient differs by {(p.grad - ref).abs().max()}"
            )
    for sid, module in stages.items():
        pairs = sum(isinstance(st, FB) and st.forward.stage_id == sid for st in schedule.steps[rank])
        assert module.pairs == pairs * steps, f"{where}: F&B hook ran {module.pairs} times, not {pairs * steps}"
    expected_peak = peak_activations(schedule.steps[rank])
    assert result.peak_live_chunks == expected_peak, f"{where}: peak {result.peak_live_chunks} != {expected_peak}"
    if rank == 0:
        table = {"1f1b": world, "zb1p": world, "dualpipe": world + 1, "dualpipev": 2 * world + 1}
        assert result.peak_live_chunks == table[name], f"{where}: peak {result.peak_live_chunks} != table"


def run_cases(rank: int, world: int, cases: list[tuple]) -> None:
    for case in cases:
        run_case(*case)
        dist.barrier()


def spawn(world: int, cases: list[tuple], timeout: float = 60.0) -> None:
    run_local(run_cases, world, args=(cases,), timeout=timeout)


def test_two_ranks_every_schedule():
    spawn(2, [("1f1b", 4), ("zb1p", 5), ("dualpipe", 4), ("dualpipe", 6), ("dualpipev", 4), ("dualpipev", 5, 2)])


def test_three_ranks_dualpipev_and_linear():
    spawn(3, [("dualpipev", 6), ("dualpipev", 8), ("1f1b", 3), ("zb1p", 6)])


def test_four_ranks_every_schedule():
    spawn(4, [("1f1b", 8, 2), ("zb1p", 8), ("dualpipe", 8, 2), ("dualpipe", 10), ("dualpipev", 8)])
