"""FP8 Linear, grouped experts, backends and convert_to_fp8 (arXiv 2412.19437 §3.3): Fprop/Dgrad/Wgrad against FP32 and
BF16 autograd, exact autograd wiring, FP8-only saved activations, and a tiny DeepSeekV3 that trains."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moetron.config import ConfigError, ModelConfig
from moetron.fp8 import backends, quant
from moetron.fp8.gemm import calc_diff, fp8_gemm
from moetron.fp8.grouped import FP8GroupedExperts, fp8_grouped_linear, fp8_swiglu_experts
from moetron.fp8.linear import FP8Linear, fp8_linear
from moetron.model import DeepSeekV3
from moetron.model.grouped_gemm import grouped_linear
from moetron.model.moe import GroupedExperts
from moetron.train.parallelize import apply_fp8 as convert_to_fp8


def cosine(a, b):
    return float(F.cosine_similarity(a.detach().flatten().double(), b.detach().flatten().double(), dim=0))


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def reference_swiglu_experts(x, gate_up, down, counts):
    gate, up = grouped_linear(x, gate_up, counts).chunk(2, dim=-1)
    return grouped_linear(F.silu(gate) * up, down, counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_fprop_dgrad_wgrad_match_autograd(dtype):
    torch.manual_seed(0)
    x, w = torch.randn(3, 50, 300), torch.randn(200, 300) * 0.05  # ragged K and N, leading batch dims
    grad = torch.randn(3, 50, 200)
    x8, w8 = leaves(x, w)
    y8 = fp8_linear(x8, w8, kernel=fp8_gemm)
    y8.backward(grad)
    xr, wr = leaves(x.to(dtype), w.to(dtype))
    yr = F.linear(xr, wr)
    yr.backward(grad.to(dtype))
    # measured (FP32 reference): 0.99931 / 0.99931 / 0.99934
    assert cosine(y8, yr) > 0.999 and cosine(x8.grad, xr.grad) > 0.999 and cosine(w8.grad, wr.grad) > 0.999
    assert x8.grad.dtype == torch.float32 and w8.grad.dtype == torch.float32


def exact_casts(monkeypatch):
    """Replace the E4M3 rounding by a plain clamp: any remaining difference is a wiring bug."""
    monkeypatch.setattr(quant, "to_fp8", lambda x, scaled=False: x.clamp(-quant.FP8_MAX, quant.FP8_MAX))


def test_linear_autograd_wiring_is_exact_without_rounding(monkeypatch):
    exact_casts(monkeypatch)
    torch.manual_seed(1)
    x, w, b = torch.randn(70, 260), torch.randn(130, 260), torch.randn(130)
    x8, w8, b8 = leaves(x, w, b)
    xr, wr, br = leaves(x, w, b)
    grad = torch.randn(70, 130)
    fp8_linear(x8, w8, b8, kernel=fp8_gemm).backward(grad)
    F.linear(xr, wr, br).backward(grad)
    for got, want in [(x8.grad, xr.grad), (w8.grad, wr.grad), (b8.grad, br.grad)]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_grouped_autograd_wiring_is_exact_without_rounding(monkeypatch):
    exact_casts(monkeypatch)
    torch.manual_seed(2)
    counts = torch.tensor([100, 0, 37, 140])
    x, w1, w2 = torch.randn(277, 64), torch.randn(4, 96, 64) * 0.1, torch.randn(4, 64, 48) * 0.1
    grad = torch.randn(277, 64)
    for fp8_fn, ref_fn, params in [
        (lambda a, p, q: fp8_grouped_linear(a, p, counts, kernel=fp8_gemm),
         lambda a, p, q: grouped_linear(a, p, counts), (w1[:, :64], w2)),
        (lambda a, p, q: fp8_swiglu_experts(a, p, q, counts, kernel=fp8_gemm),
         lambda a, p, q: reference_swiglu_experts(a, p, q, counts), (w1, w2)),
    ]:
        got, want = leaves(x, *params), leaves(x, *params)
        fp8_fn(*got).backward(grad)
        ref_fn(*want).backward(grad)
        for g, r in zip(got, want):
            if r.grad is None:
                assert g.grad is None or not g.grad.any()
            else:  # FP32 rounding only (measured calc_diff ~1e-14)
                assert calc_diff(g.grad, r.grad) < 1e-11


def test_grouped_linear_and_swiglu_experts_match_autograd():
    torch.manual_seed(3)
    counts = torch.tensor([100, 0, 37, 200])
    x = torch.randn(int(counts.sum()), 256)
    w1, w2 = torch.randn(4, 384, 256) * 0.05, torch.randn(4, 256, 192) * 0.05
    grad = torch.randn(337, 384)
    x8, w8 = leaves(x, w1)
    xr, wr = leaves(x, w1)
    y8 = fp8_grouped_linear(x8, w8, counts, kernel=fp8_gemm)
    yr = grouped_linear(xr, wr, counts)
    y8.backward(grad)
    yr.backward(grad)
    assert cosine(y8, yr) > 0.999 and cosine(x8.grad, xr.grad) > 0.999 and cosine(w8.grad, wr.grad) > 0.999
    assert torch.equal(w8.grad[1], torch.zeros_like(w8.grad[1]))  # the expert with no tokens

    # The expert FFN compounds four quantizations (x, h, silu(gate)*up, dy) on each path: measured
    # cosines 0.998 (output), 0.9974 (dx), 0.9975 (d gate_up), 0.9972 (d down).
    x8, a8, b8 = leaves(x, w1, w2)
    xr, ar, br = leaves(x, w1, w2)
    grad = torch.randn(337, 256)
    y8 = fp8_swiglu_experts(x8, a8, b8, counts, kernel=fp8_gemm)
    yr = reference_swiglu_experts(xr, ar, br, counts)
    y8.backward(grad)
    yr.backward(grad)
    for got, want in [(y8, yr), (x8.grad, xr.grad), (a8.grad, ar.grad), (b8.grad, br.grad)]:
        assert cosine(got, want) > 0.995


def test_experts_with_no_tokens_at_all():
    experts = FP8GroupedExperts(3, 128, 64)
    nn.init.normal_(experts.gate_up_proj, std=0.05)
    nn.init.normal_(experts.down_proj, std=0.05)
    x = torch.randn(0, 128, requires_grad=True)  # an expert-parallel rank that received nothing
    y = experts(x, torch.zeros(3, dtype=torch.long))
    y.sum().backward()
    assert y.shape == (0, 128) and not experts.gate_up_proj.grad.any() and x.grad.shape == (0, 128)


def saved_tensors_of(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_only_fp8_activations_are_saved_for_backward():
    torch.manual_seed(4)
    x = torch.randn(64, 256, requires_grad=True)
    linear = FP8Linear(256, 128, bias=False)
    saved = saved_tensors_of(lambda: linear(x))
    activations = [t for t in saved if t.data_ptr() != linear.weight.data_ptr()]
    assert {t.dtype for t in activations} == {torch.float8_e4m3fn, torch.float32}
    assert all(t.dtype == torch.float8_e4m3fn for t in activations if t.numel() == x.numel())
    assert sum(t.numel() for t in activations if t.dtype == torch.float32) <= x.numel() // 64  # scales only

    counts = torch.tensor([30, 34])
    experts = FP8GroupedExperts(2, 256, 96)
    nn.init.normal_(experts.gate_up_proj, std=0.05)
    nn.init.normal_(experts.down_proj, std=0.05)
    params = {p.data_ptr() for p in experts.parameters()}
    saved = saved_tensors_of(lambda: experts(x, counts))
    big = [t for t in saved if t.data_ptr() not in params and t.numel() >= 64 * 96]
    assert len(big) == 2 and all(t.dtype == torch.float8_e4m3fn for t in big)  # x (128x1) and h (1x128)


def test_fp8_linear_is_a_drop_in_for_nn_linear():
    linear = nn.Linear(64, 32)
    fp8 = FP8Linear.from_linear(linear)
    assert isinstance(fp8, nn.Linear) and fp8.weight is linear.weight and fp8.bias is linear.bias
    assert list(fp8.state_dict()) == ["weight", "bias"]
    x = torch.randn(5, 64)
    assert calc_diff(fp8(x), linear(x)) < 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp8(x).dtype == torch.bfloat16  # as nn.Linear under autocast
    with torch.no_grad():
        assert fp8(x).shape == (5, 32)


def tiny_config(**overrides):
    return ModelConfig(num_hidden_layers=2, initializer_range=0.02, **overrides)


def test_convert_swaps_the_right_modules_and_keeps_the_state_dict():
    torch.manual_seed(5)
    model = DeepSeekV3(tiny_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    convert_to_fp8(model)
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p is params[n] for n, p in model.named_parameters())  # same Parameter objects

    fp8 = {n for n, m in model.named_modules() if isinstance(m, (FP8Linear, FP8GroupedExperts))}
    plain = {n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding, GroupedExperts)}
    attn = "layers.0.self_attn."
    assert {attn + p for p in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")} <= fp8
    assert {"layers.0.mlp.gate_proj", "layers.1.mlp.experts", "layers.1.mlp.shared_experts.down_proj",
            "mtp.0.eh_proj", "mtp.0.block.mlp.experts"} <= fp8
    assert plain == {"embed_tokens", "lm_head"}  # the router `gate` is not a Linear and stays FP32
    assert len(fp8) == 2 * 5 + 3 + (3 + 1) + 1 + 5 + (3 + 1)
    convert_to_fp8(model)  # idempotent
    assert {n for n, m in model.named_modules() if isinstance(m, (FP8Linear, FP8GroupedExperts))} == fp8

    lite = DeepSeekV3(tiny_config(q_lora_rank=0))  # q_proj layouts
    convert_to_fp8(lite)
    assert isinstance(lite.layers[0].self_attn.q_proj, FP8Linear)


@pytest.fixture
def one_thread():
    """Many tiny ops: with the 2 shared cores busy, OpenMP's second thread costs more than it gives."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_converted_model_matches_and_trains(one_thread):
    torch.manual_seed(6)
    cfg = tiny_config()
    reference = DeepSeekV3(cfg)
    model = convert_to_fp8(copy.deepcopy(reference))
    tokens = torch.randint(0, cfg.vocab_size, (2, 32))
    labels = torch.roll(tokens, -1, 1)

    first_ref, first = reference(tokens, labels, mtp_lambda=0.3), model(tokens, labels, mtp_lambda=0.3)
    assert abs(first.loss.item() - first_ref.loss.item()) / first_ref.loss.item() < 2e-3  # measured 2.5e-4
    assert calc_diff(first.logits, first_ref.logits) < 1e-2  # measured 1.9e-3

    def train(net, steps=20):
        optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
        losses = []
        for _ in range(steps):  # the same batch every step: the loss must fall
            loss = net(tokens, labels, mtp_lambda=0.3).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    fp8_losses, ref_losses = train(model), train(reference)
    assert fp8_losses[-1] < 0.5 * fp8_losses[0]  # measured 8.17 -> 0.21
    tail = lambda losses: sum(losses[-5:]) / 5  # noqa: E731
    assert abs(tail(fp8_losses) - tail(ref_losses)) / tail(ref_losses) < 0.1


def test_backend_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"`fp8\.backend`: 'fp4'.*'emulated'"):
        backends.check_backend("fp4")
    with pytest.raises(ConfigError, match=r"`fp8\.backend`: 'te'.*emulated"):
        FP8Linear(8, 8, backend="te")
    with pytest.raises(ConfigError, match=r"`fp8\.backend`"):
        convert_to_fp8(DeepSeekV3(tiny_config()), backend="bf16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_torch_backend_needs_cuda():
    with pytest.raises(ConfigError, match=r"`fp8\.backend`: 'torch'.*no CUDA GPU is visible"):
        backends.check_backend("torch")
    with pytest.raises(ConfigError, match="tensors are on 'cpu'"):
        backends.gemm_kernel("torch", torch.device("cpu"))


def test_missing_transformer_engine_gives_one_clear_paragraph(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "transformer_engine", None)  # import fails
    with pytest.raises(ConfigError) as info:
        convert_to_fp8(DeepSeekV3(tiny_config()), backend="te")
    message = str(info.value)
    assert "`fp8.backend`: 'te'" in message and "Transformer Engine" in message and "Valid:" in message
    assert "\n" not in message and info.value.__cause__ is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallbacks")
def test_apex_helpers_fall_back_without_cuda():
    assert backends.apex_fused_rms_norm() is None and backends.apex_fused_adam() is None
