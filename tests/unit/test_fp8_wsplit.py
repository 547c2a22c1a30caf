"""The zero-bubble split backward with FP8 GEMMs (DeepSeek-V3 report §3.2.1 with §3.3): B runs only the
Dgrad GEMMs of the FP8 Linear and grouped-expert Functions, the deferred W only their Wgrad GEMMs, and
every gradient equals the unsplit backward's bit for bit, directly (ChunkBackward) and through the
PipelineExecutor running ZB1P.

GEMMs are counted by a wrapper around the emulated kernel: Wgrad calls are the ones with 1x128 scales on
both operands (b_block=False); Fprop and Dgrad have 128x128 weight blocks (b_block=True).
"""

from __future__ import annotations

import pytest
import torch
from helpers import world_of_one
from moetron.parallel import ChunkBackward, PipelineExecutor, build_schedule
from torch import nn
from torch.autograd.graph import get_gradient_edge

from moetron.fp8 import grouped, linear
from moetron.fp8.gemm import fp8_gemm
from moetron.fp8.grouped import FP8GroupedExperts, fp8_grouped_linear
from moetron.fp8.linear import FP8Linear

DIM, EXPERTS, INTER = 160, 3, 96  # ragged against 128 on purpose


class CountingKernel:
    def __init__(self):
        self.wgrad = self.other = 0

    def __call__(self, *args, b_block=False, **kwargs):
        if b_block:
            self.other += 1
        else:
            self.wgrad += 1
        return fp8_gemm(*args, b_block=b_block, **kwargs)

    def take(self) -> tuple[int, int]:
        counts, self.wgrad, self.other = (self.wgrad, self.other), 0, 0
        return counts


@pytest.fixture
def kernel(monkeypatch):
    counting = CountingKernel()
    monkeypatch.setattr(linear, "gemm_kernel", lambda backend, device: counting)
    monkeypatch.setattr(grouped, "gemm_kernel", lambda backend, device: counting)
    return counting


def routing(rows: int) -> torch.Tensor:
    return torch.tensor([rows // 3, 0, rows - rows // 3])  # an expert with no tokens too


class GroupedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(EXPERTS, DIM, DIM) * 0.05)

    def forward(self, x):
        return fp8_grouped_linear(x, self.weight, routing(x.shape[0]), kernel=linear.gemm_kernel("emulated", x.device))


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.ffn = FP8GroupedExperts(EXPERTS, DIM, INTER)
        nn.init.normal_(self.ffn.gate_up_proj, std=0.05)
        nn.init.normal_(self.ffn.down_proj, std=0.05)

    def forward(self, x):
        return self.ffn(x, routing(x.shape[0]))


class Block(nn.Module):
    """FP8 Linear (with bias) -> tanh -> FP8 SwiGLU experts -> FP8 grouped Linear, with a residual."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = FP8Linear(DIM, DIM)
        self.experts, self.out = Experts(), GroupedLinear()

    def forward(self, x):
        return x + self.out(self.experts(torch.tanh(self.lin(x))))


# Wgrad GEMMs of one backward through each module for `rows` tokens (one per expert with tokens).
WGRADS = {"linear": 1, "grouped linear": 2, "swiglu experts": 4, "block": 1 + 4 + 2}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return {"linear": lambda: FP8Linear(DIM, DIM), "grouped linear": GroupedLinear,
            "swiglu experts": Experts, "block": Block}[name]()


@pytest.mark.parametrize("name", list(WGRADS))
def test_b_runs_dgrad_only_w_runs_wgrad_only_and_gradients_are_bitwise_equal(kernel, name):
    module = build(name)
    params = list(module.parameters())
    torch.manual_seed(1)
    data, grad = torch.randn(200, DIM), torch.randn(200, DIM)

    x = data.clone().requires_grad_()
    out = module(x)
    kernel.take()
    reference = torch.autograd.grad(out, [x, *params], grad)  # the unsplit backward
    unsplit_wgrad, unsplit_other = kernel.take()
    assert unsplit_wgrad == WGRADS[name]

    x = data.clone().requires_grad_()
    backward = ChunkBackward(get_gradient_edge(module(x)), grad, [x])
    kernel.take()
    (dx,) = backward.inputs_only()
    b_wgrad, b_other = kernel.take()
    assert all(p.grad is None for p in params), "B must leave the weight gradients to W"
    backward.weights()
    w_wgrad, w_other = kernel.take()

    assert b_wgrad == 0, f"{name}: B ran {b_wgrad} Wgrad GEMMs"
    assert w_other == 0, f"{name}: W ran {w_other} Dgrad GEMMs"
    assert (b_other, w_wgrad) == (unsplit_other, unsplit_wgrad), "each GEMM runs exactly once"
    for got, want in zip([dx, *(p.grad for p in params)], reference, strict=True):
        assert torch.equal(got, want)


def test_split_backward_with_no_input_gradient(kernel):
    """A first stage (token ids in): B has no Dgrad to run into the input, W still gets every weight."""
    module = build("block")
    data, grad = torch.randn(130, DIM), torch.randn(130, DIM)
    reference = torch.autograd.grad(module(data), list(module.parameters()), grad)
    kernel.take()
    backward = ChunkBackward(get_gradient_edge(module(data)), grad, [])
    kernel.take()
    assert backward.inputs_only() == []
    assert kernel.take()[0] == 0
    backward.weights()
    assert kernel.take() == (WGRADS["block"], 0)
    assert all(torch.equal(p.grad, r) for p, r in zip(module.parameters(), reference, strict=True))


def test_an_ordinary_backward_still_computes_everything(kernel):
    module = build("block")
    x = torch.randn(64, DIM, requires_grad=True)
    module(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in module.parameters())
    assert kernel.take()[0] == WGRADS["block"]
    # Only the input gradient asked for: no Wgrad GEMM at all.
    x2 = torch.randn(64, DIM, requires_grad=True)
    (gx,) = torch.autograd.grad(module(x2).sum(), [x2])
    assert kernel.take()[0] == 0 and gx.shape == x2.shape


@pytest.fixture
def one_rank():
    with world_of_one():
        yield


def test_zb1p_defers_the_fp8_wgrad_and_matches_the_unsplit_backward(one_rank, kernel, monkeypatch):
    chunks, rows = 3, 100
    stage = build("block")
    schedule = build_schedule("zb1p", 1, chunks)
    torch.manual_seed(2)
    inputs, targets = torch.randn(chunks * rows, DIM), torch.randn(chunks * rows, DIM)

    def loss_fn(out, target):
        return ((out - target) ** 2).mean() / chunks

    # Reference: each micro-batch's unsplit gradients, added in micro-batch order (ZB1P's W order here).
    params = list(stage.parameters())
    reference = None
    for x, y in zip(torch.tensor_split(inputs, chunks), torch.tensor_split(targets, chunks), strict=True):
        grads = torch.autograd.grad(loss_fn(stage(x), y), params)
        reference = grads if reference is None else [a + b for a, b in zip(reference, grads, strict=True)]

    # Count GEMMs per action: the store runs W, ChunkBackward.inputs_only runs B.
    phases = []
    for method in ("inputs_only", "weights"):
        original = getattr(ChunkBackward, method)

        def counted(self, _original=original, _name=method):
            kernel.take()
            result = _original(self)
            phases.append((_name, *kernel.take()))
            return result

        monkeypatch.setattr(ChunkBackward, method, counted)
    assert [str(a) for a in schedule.steps[0]][:3] == ["F0@0", "B0@0", "W0@0"]
    PipelineExecutor(schedule, {0: stage}, loss_fn).step(inputs, targets)

    b = [p for p in phases if p[0] == "inputs_only"]
    w = [p for p in phases if p[0] == "weights"]
    assert len(b) == len(w) == chunks
    assert all(wgrad == 0 and other > 0 for _, wgrad, other in b), phases  # B: Dgrad only
    assert all(wgrad == WGRADS["block"] and other == 0 for _, wgrad, other in w), phases  # W: Wgrad only
    for p, want in zip(params, reference, strict=True):
        assert torch.equal(p.grad, want)
