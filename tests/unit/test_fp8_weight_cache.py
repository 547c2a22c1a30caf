"""The FP8 weight cache: W is quantized once per weight version (W^T's copy derived from it), shared by every micro-batch, and
quantized again whenever the weight changes (optimizer step, checkpoint load, a new Parameter). Checked
against quantization counts and against modules with no history (a fresh cache), bit for bit."""

from __future__ import annotations

import torch

from moetron.fp8 import weight_cache
from moetron.fp8.grouped import FP8GroupedExperts
from moetron.fp8.linear import FP8Linear


def counting(monkeypatch) -> list:
    calls = []
    real = weight_cache.quantize_128x128

    def quantize(w, power_of_two=False):
        calls.append(tuple(w.shape))
        return real(w, power_of_two)

    monkeypatch.setattr(weight_cache, "quantize_128x128", quantize)
    return calls


def linear(seed: int = 0) -> FP8Linear:
    torch.manual_seed(seed)
    return FP8Linear.from_linear(torch.nn.Linear(256, 192))


def experts(seed: int = 0) -> FP8GroupedExperts:
    torch.manual_seed(seed)
    module = FP8GroupedExperts(3, 160, 96)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return module


def run_experts(module, x):
    return module(x, torch.tensor([5, 0, 11]))  # tokens per expert, one expert without any


def micro_batches(module, xs, run=lambda m, x: m(x)):
    """Forward and backward of each micro-batch, gradients accumulating: the outputs and the .grads."""
    outs = []
    for x in xs:
        out = run(module, x)
        out.square().sum().backward()
        outs.append(out.detach())
    return outs, [p.grad.clone() for p in module.parameters()]


def test_linear_quantizes_each_weight_version_once(monkeypatch):
    calls = counting(monkeypatch)
    module, xs = linear(), [torch.randn(16, 256, requires_grad=True) for _ in range(4)]
    micro_batches(module, xs)
    assert calls == [(192, 256)]  # W once for four micro-batches; W^T for Dgrad is W's copy transposed
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    micro_batches(module, xs)
    assert len(calls) == 2  # the step changed W: quantized again


def test_experts_quantize_each_weight_version_once(monkeypatch):
    calls = counting(monkeypatch)
    module, xs = experts(), [torch.randn(16, 160, requires_grad=True) for _ in range(3)]
    micro_batches(module, xs, run_experts)
    assert sorted(calls) == sorted([(3, 192, 160), (3, 160, 96)])  # W^T copies are derived from these


def same_as_fresh(module, make, xs, run=lambda m, x: m(x)):
    """module (with its cache's history) computes what a module with the same weights and no cache
    history computes, bit for bit."""
    fresh = make()
    fresh.load_state_dict(module.state_dict())
    for p in (*module.parameters(), *fresh.parameters()):
        p.grad = None
    got, want = micro_batches(module, xs, run), micro_batches(fresh, xs, run)
    return all(torch.equal(a, b) for a, b in zip(got[0] + got[1], want[0] + want[1], strict=True))


def test_a_changed_weight_is_quantized_again():
    xs = [torch.randn(16, 256, requires_grad=True) for _ in range(2)]
    module = linear()
    before = micro_batches(module, xs)[0]
    torch.optim.AdamW(module.parameters(), lr=0.01).step()  # in place, as every optimizer
    assert same_as_fresh(module, linear, xs)
    assert not torch.equal(micro_batches(module, xs)[0][0], before[0])
    module.load_state_dict(linear(seed=1).state_dict())  # a checkpoint load: copy_ into the same tensors
    assert same_as_fresh(module, linear, xs)
    module.weight = torch.nn.Parameter(torch.randn(192, 256) * 0.05)  # another Parameter object
    assert same_as_fresh(module, linear, xs)


def test_changed_expert_weights_are_quantized_again():
    xs = [torch.randn(16, 160, requires_grad=True) for _ in range(2)]
    module = experts()
    micro_batches(module, xs, run_experts)
    torch.optim.SGD(module.parameters(), lr=0.5).step()
    assert same_as_fresh(module, experts, xs, run_experts)
    with torch.no_grad():
        module.down_proj.mul_(2)  # only one of the two weights changes
    assert same_as_fresh(module, experts, xs, run_experts)
