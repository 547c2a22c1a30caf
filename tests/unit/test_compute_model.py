"""The compute model charges each GEMM module its FLOPs / rate after the forward, as much again for the input
gradients (B) and for the weight gradients (W) where autograd computes them, and leaves the arithmetic
unchanged. A fake sleep records the charges."""

import pytest
import torch
from moetron.comm.compute_model import ComputeModel
from moetron.parallel.weight_grad import ChunkBackward
from torch import nn

from moetron.model.moe import GroupedExperts

RATE = 1e6


def charged():
    slept = []
    model = ComputeModel(flops_per_s=RATE, sleep=slept.append)
    return model, slept


def test_linear_is_charged_forward_then_b_then_w():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    model, slept = charged()
    handles = model.attach(layer)
    y = layer(x)
    forward = 2 * 4 * 16 * 8 / RATE
    assert slept == [pytest.approx(forward)]
    chunk = ChunkBackward(torch.autograd.graph.get_gradient_edge(y.sum()), torch.ones(()), [x])
    chunk.inputs_only()  # B: the input gradient's GEMM
    assert slept == [pytest.approx(forward)] * 2
    chunk.weights()  # W: the weight gradient's GEMM
    assert slept == [pytest.approx(forward)] * 3
    assert model.modelled_s == pytest.approx(3 * forward)
    for h in handles:
        h.remove()
    assert layer(x) is not None and len(slept) == 3  # detached: no more charges


def test_arithmetic_is_unchanged_bit_for_bit():
    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 8)
    nn.init.normal_(experts.gate_up_proj, std=0.1)
    nn.init.normal_(experts.down_proj, std=0.1)
    x = torch.randn(10, 16, requires_grad=True)
    counts = torch.tensor([3, 0, 4, 3])
    reference = experts(x, counts)
    (grad_ref,) = torch.autograd.grad(reference.square().sum(), x)
    model, slept = charged()
    model.attach(experts)
    out = experts(x, counts)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.equal(out, reference) and torch.equal(grad, grad_ref)
    forward = 2 * 10 * 16 * 16 * 1.5 / RATE  # rows x hidden x 2I, then the down projection (I = 8)
    assert slept[0] == pytest.approx(forward)
    assert sum(slept) == pytest.approx(2 * forward)  # forward + B (autograd.grad to x computes no W)


def test_rate_must_be_positive():
    with pytest.raises(ValueError, match="flops_per_s"):
        ComputeModel(flops_per_s=0)
