"""The executor defers W: after a B action the stage's weight gradients are untouched (None on the first
micro-batch, unchanged on later ones), and the W action fills them; the sum equals one full backward.
A B that also computed the weight gradients (a full backward in B) fails here. One rank, ZB1P."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from moetron.parallel import PipelineExecutor, WeightGradStore, build_schedule
from test_pipeline_executor import DIM, Block, make_loss
from torch import nn

CHUNKS, ROWS = 3, 6


def build_stage() -> nn.Module:
    """A norm, a Linear, grouped expert GEMMs and a head, fed float activations (as a stage after the first:
    on a first stage whose embedding output also feeds a residual, the split falls back to a full B)."""
    torch.manual_seed(0)
    return nn.Sequential(Block(), nn.Linear(DIM, 3))


def make_batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(CHUNKS * ROWS, DIM, generator=g), torch.randn(CHUNKS * ROWS, 3, generator=g)


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class RecordingStore(WeightGradStore):
    """The executor's store of deferred W's, recording every weight gradient before and after each W."""

    def __init__(self, params):
        super().__init__()
        self.params, self.log = params, []

    def run(self, key):
        before = [None if p.grad is None else p.grad.clone() for p in self.params]
        super().run(key)
        self.log.append((key, before, [None if p.grad is None else p.grad.clone() for p in self.params]))


def test_b_leaves_weight_gradients_to_w(one_rank):
    schedule = build_schedule("zb1p", 1, CHUNKS)
    stage = build_stage()
    params = list(stage.parameters())
    executor = PipelineExecutor(schedule, {0: stage}, make_loss(CHUNKS))
    executor.weight_grads = store = RecordingStore(params)
    inputs, targets = make_batch()
    executor.step(inputs, targets)

    assert [key[0] for key, _, _ in store.log] == list(range(CHUNKS))  # one W per micro-batch, in order
    _, before, after = store.log[0]
    assert all(g is None for g in before), "B of micro-batch 0 already wrote weight gradients"
    assert all(g is not None for g in after), "W of micro-batch 0 left weight gradients empty"
    for m in range(1, CHUNKS):
        _, before, after = store.log[m]
        previous = store.log[m - 1][2]
        assert all(torch.equal(b, p) for b, p in zip(before, previous)), f"B of micro-batch {m} changed .grad"
        assert any(not torch.equal(a, b) for a, b in zip(after, before)), f"W of micro-batch {m} added nothing"

    # The deferred W's add up to one ordinary backward of the whole batch.
    reference = build_stage()
    loss_fn = make_loss(CHUNKS)
    for x, t in zip(torch.tensor_split(inputs, CHUNKS), torch.tensor_split(targets, CHUNKS)):
        loss_fn(reference(x), t).backward()
    for p, r in zip(params, reference.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-7)
