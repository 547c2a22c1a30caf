"""The executor in this process (a gloo group of one): local stage-to-stage hand-offs and the
errors a user sees for bad arguments."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from moetron.parallel import PipelineExecutor, StageId, build_schedule
from test_pipeline_executor import build_stage, make_loss, run_case
from torch import nn


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("name,chunks", [("dualpipev", 2), ("dualpipev", 3), ("1f1b", 2), ("zb1p", 3)])
def test_one_rank_matches_single_process(one_rank, name, chunks):
    run_case(name, chunks, steps=2)  # DualPipeV on one rank: both stages here, the turn is local


def test_bad_arguments_are_explained(one_rank):
    schedule = build_schedule("dualpipev", 1, 2)
    stages = {StageId(0, 0): build_stage(0, 2), StageId(1, 0): build_stage(1, 2)}
    with pytest.raises(ValueError, match=r"stages on rank 0 must be the stage copies \[\(0, 0\), \(1, 0\)\]"):
        PipelineExecutor(schedule, {0: stages[StageId(0, 0)]}, make_loss(2))
    with pytest.raises(ValueError, match="loss_fn is required on rank 0"):
        PipelineExecutor(schedule, stages)
    with pytest.raises(ValueError, match="group has 1 ranks but schedule 1F1B is built for num_ranks=2"):
        PipelineExecutor(build_schedule("1f1b", 2, 2), stages, make_loss(2))
    executor = PipelineExecutor(schedule, {0: stages[StageId(0, 0)], 1: stages[StageId(1, 0)]}, make_loss(2))
    with pytest.raises(ValueError, match="inputs is required on rank 0"):
        executor.step(None, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="sequence of 3 micro-batches but the schedule has 2"):
        executor.step([torch.zeros(2, dtype=torch.long)] * 3, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="targets has 1 rows along dim 0, fewer than the 2"):
        executor.step(torch.zeros(4, dtype=torch.long), torch.zeros(1, 3))


def test_custom_forward_backward_hook_gets_both_jobs(one_rank):
    seen = []

    def hook(forward, backward):
        seen.append((str(forward.action), str(backward.action), isinstance(forward.module, nn.Module)))
        return forward.run(), backward.run()

    schedule = build_schedule("dualpipev", 1, 3)
    stages = {0: build_stage(0, 2), 1: build_stage(1, 2)}
    result = PipelineExecutor(schedule, stages, make_loss(3), forward_backward=hook).step(
        torch.randint(0, 16, (9,)), torch.randn(9, 3))
    assert seen == [("F1@1", "BW0@0", True), ("F2@0", "BW1@1", True), ("F2@1", "BW1@0", True)]
    assert all(loss is not None for loss in result.losses)
