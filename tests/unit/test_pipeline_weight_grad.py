"""Splitting a chunk's backward into B (inputs) and W (weights) on the autograd graph."""

from __future__ import annotations

import pytest
import torch
from moetron.parallel import ChunkBackward, WeightGradStore
from torch import nn
from torch.autograd.graph import get_gradient_edge


class Grouped(nn.Module):
    def __init__(self, experts: int = 2, dim: int = 8):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, dim, dim) / 3)

    def forward(self, x):
        offs = torch.tensor([x.shape[0] // 2, x.shape[0]], dtype=torch.int32)
        return torch._grouped_mm(x, self.weight.transpose(-2, -1), offs=offs)


def stack(first: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Embedding(16, 8)] if first else []
    return nn.Sequential(*layers, nn.Linear(8, 8), nn.GELU(), Grouped(), nn.Tanh(), nn.Linear(8, 8, bias=False))


@pytest.mark.parametrize("first", [False, True], ids=["middle stage", "first stage (no input grad)"])
def test_split_equals_full_backward_bitwise(first):
    model = stack(first)
    data = torch.randint(0, 16, (6,)) if first else torch.randn(6, 8)
    grad = torch.randn(6, 8)

    def chunk():
        x = data if first else data.clone().requires_grad_()
        return x, model(x)

    x, out = chunk()
    inputs = [] if first else [x]
    ref = torch.autograd.grad(out, inputs + list(model.parameters()), grad)

    x, out = chunk()
    inputs = [] if first else [x]
    backward = ChunkBackward(get_gradient_edge(out), grad, inputs)
    input_grads = backward.inputs_only()
    assert all(p.grad is None for p in model.parameters()), "B must not touch weight gradients"
    backward.weights()
    got = input_grads + [p.grad for p in model.parameters()]
    assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref))


def test_b_skips_the_weight_gemms():
    model = stack(False)
    x = torch.randn(6, 8, requires_grad=True)
    backward = ChunkBackward(get_gradient_edge(model(x)), torch.randn(6, 8), [x])

    def gemms(fn):
        with torch.profiler.profile() as prof:
            fn()
        return sum(e.name in ("aten::mm", "aten::addmm", "aten::_grouped_mm") for e in prof.events())

    # Each half runs one GEMM per Linear and one grouped GEMM (itself one mm per expert on CPU).
    assert gemms(backward.inputs_only) == gemms(backward.weights) == 2 + 1 + 2


def test_shared_weight_falls_back_to_full_backward_in_b():
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    out = lin(torch.relu(lin(x)))  # the same weight under two frontier nodes
    ref = torch.autograd.grad(out, [x, lin.weight, lin.bias], torch.ones(4, 8), retain_graph=True)
    backward = ChunkBackward(get_gradient_edge(out), torch.ones(4, 8), [x])
    (gx,) = backward.inputs_only()
    assert lin.weight.grad is not None  # done at once, no double counting later
    backward.weights()
    assert torch.equal(gx, ref[0]) and torch.equal(lin.weight.grad, ref[1]) and torch.equal(lin.bias.grad, ref[2])


def test_store_is_per_instance_and_checks_keys():
    a, b = WeightGradStore(), WeightGradStore()
    lin = nn.Linear(2, 2)
    x = torch.randn(1, 2, requires_grad=True)
    backward = ChunkBackward(get_gradient_edge(lin(x)), torch.ones(1, 2), [x])
    backward.inputs_only()
    a.put((0, 1, 0), backward)
    assert len(a) == 1 and len(b) == 0
    with pytest.raises(RuntimeError, match="never ran"):
        b.run((0, 1, 0))
    a.run((0, 1, 0))
    assert len(a) == 0 and lin.weight.grad is not None
