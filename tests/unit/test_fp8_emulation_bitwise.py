"""The faster FP8 emulation computes exactly what the old one did: every quantizer, the emulated GEMM in
each operand layout the Functions use, the FP8 Functions' outputs and gradients, and a whole tiny model's
loss and gradients are equal bit for bit to the reference (fp8_emulation_reference.py, the code before it
was made faster, run in this process on the same inputs)."""

from __future__ import annotations

import copy

import fp8_emulation_reference as ref
import pytest
import torch
from helpers import small_model_config

from moetron.fp8 import grouped, linear, quant, weight_cache
from moetron.fp8.gemm import fp8_gemm
from moetron.model import DeepSeekV3
from moetron.train.parallelize import apply_fp8

QUANTIZERS = ("quantize_1x128", "quantize_128x128", "quantize_128x1")


def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Equal bits (FP8 compared as bytes), dtype, shape and memory layout (strides of dims of size 1
    do not matter)."""
    if a is None or b is None:
        return a is b
    if a.dtype == quant.FP8_DTYPE and b.dtype == quant.FP8_DTYPE:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    layout = [(size, stride) for size, stride in zip(a.shape, a.stride(), strict=True) if size > 1]
    other = [(size, stride) for size, stride in zip(b.shape, b.stride(), strict=True) if size > 1]
    return a.dtype == b.dtype and a.shape == b.shape and layout == other and torch.equal(a, b)


def awkward(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Values over many binades, an all-zero block of rows, a huge and a NaN-free tiny tile."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp(3 * torch.randn(rows, 1, generator=g))
    x[: rows // 4] = 0
    if rows > 2:
        x[-1] *= 1e6
        x[-2] *= 1e-7
    return x.to(dtype)


SHAPES = [(1, 7), (5, 128), (130, 64), (256, 384), (300, 192), (1024, 128), (77, 260)]


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("power_of_two", [False, True])
def test_quantizers_are_bitwise_unchanged(rows, cols, dtype, power_of_two):
    x = awkward(rows, cols, dtype, rows * cols)
    for name in QUANTIZERS:
        got, want = getattr(quant, name)(x, power_of_two), getattr(ref, name)(x, power_of_two)
        assert same(got[0], want[0]) and same(got[1], want[1]), name
    counts = torch.tensor([rows // 3, 0, rows - rows // 3])
    got, want = quant.quantize_128x1_grouped(x, counts, power_of_two), ref.quantize_128x1_grouped(x, counts, power_of_two)
    assert same(got[0], want[0]) and same(got[1], want[1])
    data, scales = got
    assert torch.equal(quant.fp8_to_float(data), data.float())
    assert same(quant.fp8_to_float(data.t()), data.t().float())  # a transposed operand stays transposed


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (64, 96, 128), (1024, 64, 384), (300, 130, 260), (33, 48, 32)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gemm_is_bitwise_unchanged(m, n, k, out_dtype):
    a = quant.quantize_1x128(awkward(m, k, torch.float32, 1))
    w = quant.quantize_128x128(awkward(n, k, torch.float32, 2))
    assert same(fp8_gemm(*a, *w, b_block=True, out_dtype=out_dtype), ref.fp8_gemm(*a, *w, b_block=True, out_dtype=out_dtype))
    # Wgrad's operands: 128x1 tiles along tokens (k here), passed transposed as linear.wgrad does.
    dy_t, x_t = quant.quantize_128x1(awkward(k, m, torch.float32, 3)), quant.quantize_128x1(awkward(k, n, torch.float32, 4))
    got = linear.wgrad(fp8_gemm, *dy_t, *x_t, out_dtype)
    assert same(got, linear.wgrad(ref.fp8_gemm, *dy_t, *x_t, out_dtype))
    prepared = fp8_gemm.prepare(a[0]), fp8_gemm.prepare(w[0])  # the form grouped GEMMs pass in
    assert same(fp8_gemm(prepared[0], a[1], prepared[1], w[1], b_block=True), ref.fp8_gemm(*a, *w, b_block=True))


@pytest.fixture
def reference_emulation(monkeypatch):
    """Runs the FP8 Functions on the reference quantizers and GEMM."""

    def use():
        for module in (linear, grouped, weight_cache):
            for name in (*QUANTIZERS, "quantize_128x1_grouped"):
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, getattr(ref, name))
            if hasattr(module, "gemm_kernel"):
                monkeypatch.setattr(module, "gemm_kernel", lambda backend, device: ref.fp8_gemm)

    return use


def run_functions(seed: int, autocast: bool):
    torch.manual_seed(seed)
    n, h, i, e = 517, 160, 96, 3
    counts = torch.tensor([200, 0, 317])
    tensors = [torch.randn(n, h), torch.randn(2 * i, h) * 0.05, torch.randn(2 * i) * 0.1,
               torch.randn(e, 2 * i, h) * 0.05, torch.randn(e, h, i) * 0.05, torch.randn(e, h, h) * 0.05]
    grads = torch.randn(n, 2 * i), torch.randn(n, h)
    leaves = [t.requires_grad_() for t in tensors]
    x, w, b, gate_up, down, w_grouped = leaves
    kernel = linear.gemm_kernel("emulated", x.device)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outs = [linear.fp8_linear(x, w, b, kernel=kernel),
                grouped.fp8_swiglu_experts(x, gate_up, down, counts, kernel=kernel),
                grouped.fp8_grouped_linear(x, w_grouped, counts, kernel=kernel)]
    loss = (outs[0].float() * grads[0]).sum() + sum((o.float() * grads[1]).sum() for o in outs[1:])
    loss.backward()
    return [o.detach() for o in outs] + [t.grad for t in leaves]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16 autocast"])
def test_fp8_functions_are_bitwise_unchanged(reference_emulation, autocast):
    got = run_functions(0, autocast)
    reference_emulation()
    want = run_functions(0, autocast)
    assert all(same(a, b) for a, b in zip(got, want, strict=True))


@pytest.fixture
def one_thread():
    """The model's own backward (embedding, norm weights) sums in a thread-dependent order: one thread
    makes the step reproducible, so any difference left is the emulation's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_small_model_step_is_bitwise_unchanged(one_thread, reference_emulation):
    cfg = small_model_config(hidden_size=160, intermediate_size=192, moe_intermediate_size=48)
    torch.manual_seed(0)
    model = apply_fp8(DeepSeekV3(cfg))
    tokens = torch.randint(0, cfg.vocab_size, (2, 65))

    def step():
        net = copy.deepcopy(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(tokens[:, :-1], tokens[:, 1:], mtp_lambda=0.3)
        out.loss.backward()
        return [out.loss.detach()] + [p.grad for p in net.parameters()]

    got = step()
    reference_emulation()
    want = step()
    assert len(got) > 10 and all(same(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("shape", [(256, 384), (300, 130), (64, 96), (3, 128, 256), (3, 100, 200), (2, 256, 96), (1, 7)])
@pytest.mark.parametrize("power_of_two", [False, True])
@pytest.mark.parametrize("kernel", [fp8_gemm, lambda *a, **k: None], ids=["emulated", "no prepare"])
def test_cached_weight_copies_are_bitwise_unchanged(shape, power_of_two, kernel):
    """The cache's W and W^T copies (W^T derived from W's) are what quantizing each orientation gives,
    in the same layout, in the kernel's form."""
    w = awkward(shape[-2] * (shape[0] if len(shape) == 3 else 1), shape[-1], torch.float32, 5).view(shape)
    cache = weight_cache.QuantizedWeights()
    for transposed in (False, True, False, True):  # misses, then hits
        got = cache.get(w, kernel, power_of_two, transposed)
        want = ref.quantize_128x128(w.transpose(-2, -1) if transposed else w, power_of_two)
        want = (weight_cache.prepared(kernel, want[0]), want[1])
        assert same(got[0], want[0]) and same(got[1], want[1]), transposed
    fresh = weight_cache.QuantizedWeights().get(w, kernel, power_of_two, transposed=True)  # W^T first
    assert same(fresh[0], want[0]) and same(fresh[1], want[1])


@pytest.mark.parametrize("k", [48, 128, 160, 300])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemms_are_bitwise_unchanged(k, out_dtype):
    """The emulated kernel's own loops over experts (Fprop/Dgrad and Wgrad) against one reference GEMM per
    expert, with experts of one, a few and many rows (small GEMMs take other BLAS paths) and empty ones."""
    splits, n = [1, 0, 2, 3, 17, 130, 0, 40], 96
    a = quant.quantize_1x128(awkward(sum(splits), k, torch.float32, 6))
    w = quant.quantize_128x128(awkward(len(splits) * n, k, torch.float32, 7).view(len(splits), n, k))
    got = grouped.grouped_gemm(fp8_gemm, *a, *w, splits, out_dtype)
    want = grouped.grouped_gemm(ref.fp8_gemm, *a, *w, splits, out_dtype)
    assert same(got, want)
    counts = torch.tensor(splits)
    dy_t = quant.quantize_128x1_grouped(awkward(sum(splits), n, torch.float32, 8), counts)
    x_t = quant.quantize_128x1_grouped(awkward(sum(splits), k, torch.float32, 9), counts)
    got = grouped.grouped_wgrad(fp8_gemm, *dy_t, *x_t, splits, torch.zeros(len(splits), n, k))
    want = grouped.grouped_wgrad(ref.fp8_gemm, *dy_t, *x_t, splits, torch.zeros(len(splits), n, k))
    assert same(got, want)
