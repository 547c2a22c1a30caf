"""FP8 backends that need a GPU: `torch` (torch's FP8 tensor-core GEMMs) and `te` (Transformer Engine).
Skipped without CUDA; the `te` tests also without Transformer Engine."""

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from moetron.config import ModelConfig
from moetron.fp8 import backends
from moetron.fp8.gemm import calc_diff, fp8_gemm
from moetron.fp8.grouped import fp8_swiglu_experts
from moetron.fp8.linear import FP8Linear
from moetron.fp8.quant import quantize_1x128, quantize_128x128
from moetron.model import DeepSeekV3
from moetron.train.parallelize import apply_fp8 as convert_to_fp8

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

needs_fp8_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a GPU with FP8 tensor cores",
)
needs_te = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                              reason="needs Transformer Engine")


@needs_fp8_gpu
@pytest.mark.parametrize("m,n,k", [(256, 512, 7168), (33, 200, 300), (128, 128, 128)])
@pytest.mark.parametrize("b_block", [True, False])
def test_torch_kernel_matches_emulation(m, n, k, b_block):
    torch.manual_seed(0)
    a, b = torch.randn(m, k, device="cuda"), torch.randn(n, k, device="cuda")
    a_q, a_s = quantize_1x128(a)
    b_q, b_s = quantize_128x128(b) if b_block else quantize_1x128(b)
    kernel = backends.gemm_kernel("torch", a.device)
    out = kernel(a_q, a_s, b_q, b_s, b_block=b_block, out_dtype=torch.float32)
    assert out.shape == (m, n)
    assert calc_diff(out, a @ b.T) < 2e-3
    if kernel is backends.torch_blockwise_gemm:  # the recipe itself: the emulation's numerics
        assert calc_diff(out, fp8_gemm(a_q, a_s, b_q, b_s, b_block=b_block)) < 1e-5


@needs_fp8_gpu
def test_torch_backend_linear_and_experts_gradients():
    torch.manual_seed(1)
    x = torch.randn(96, 256, device="cuda", requires_grad=True)
    linear = FP8Linear(256, 384, bias=False, device="cuda", backend="torch")
    ref_x, ref_w = x.detach().clone().requires_grad_(), linear.weight.detach().clone().requires_grad_()
    grad = torch.randn(96, 384, device="cuda")
    linear(x).backward(grad)
    F.linear(ref_x, ref_w).backward(grad)
    assert calc_diff(x.grad, ref_x.grad) < 2e-3 and calc_diff(linear.weight.grad, ref_w.grad) < 2e-3

    counts = torch.tensor([40, 0, 56], device="cuda")
    w1 = (torch.randn(3, 256, 256, device="cuda") * 0.05).requires_grad_()
    w2 = (torch.randn(3, 256, 128, device="cuda") * 0.05).requires_grad_()
    kernel = backends.gemm_kernel("torch", x.device)
    y = fp8_swiglu_experts(x.detach(), w1, w2, counts, kernel=kernel)
    y_emulated = fp8_swiglu_experts(x.detach(), w1.detach(), w2.detach(), counts, kernel=fp8_gemm)
    assert calc_diff(y, y_emulated) < 1e-3
    y.sum().backward()
    assert torch.isfinite(w1.grad).all() and not w1.grad[1].any()


def tiny_step(backend):
    torch.manual_seed(2)
    cfg = ModelConfig(num_hidden_layers=2, initializer_range=0.02)
    reference = DeepSeekV3(cfg).cuda()
    model = convert_to_fp8(copy.deepcopy(reference), backend=backend)
    assert list(model.state_dict()) == list(reference.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    labels = torch.roll(tokens, -1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens, labels, mtp_lambda=0.3).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        first = reference(tokens, labels, mtp_lambda=0.3).loss.item()
    assert abs(losses[0] - first) / first < 1e-2
    assert losses[-1] < 0.8 * losses[0]


@needs_fp8_gpu
def test_torch_backend_trains_the_tiny_model():
    tiny_step("torch")


@needs_te
def test_te_backend_trains_the_tiny_model():
    tiny_step("te")


@needs_te
def test_te_linear_keeps_names_and_matches():
    linear = torch.nn.Linear(256, 128, bias=True, device="cuda")
    te_linear = backends.TELinear(linear)
    assert list(te_linear.state_dict()) == ["weight", "bias"]
    x = torch.randn(64, 256, device="cuda")
    assert calc_diff(te_linear(x).float(), linear(x)) < 2e-3


def test_apex_helpers_return_a_class_or_none():
    for helper in (backends.apex_fused_rms_norm, backends.apex_fused_adam):
        found = helper()
        assert found is None or isinstance(found, type)
