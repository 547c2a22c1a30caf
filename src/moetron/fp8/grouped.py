"""FP8 grouped GEMMs for the routed experts: rows sorted by expert, per-expert weights [E, out, in],
counts [E]. The same recipe as linear.py, with the Wgrad's 128x1 tiles restarting at every expert so
no tile mixes two experts' tokens.

FP8SwiGLUExperts is the whole expert FFN, down(silu(gate) * up): its saved activations are the input x
(128x1, FP8) and the SwiGLU input h = [gate, up] (1x128, FP8); the SwiGLU output is recomputed from h in
backward instead of being stored (arXiv 2412.19437 §3.3).

Dgrad and Wgrad run only when the backward asks for them (edges.py). In a split backward B runs the
Dgrads and keeps for W the FP8 operands of the two Wgrads it cannot rebuild without a Dgrad GEMM, the
SwiGLU output and its gradient dh, each quantized 128x1 (as the report caches FP8 activations); W then
runs the two Wgrad GEMMs only.
"""

import torch
import torch.nn.functional as F
from torch import nn

from moetron.fp8.backends import Kernel, check_kernel_backend, gemm_kernel
from moetron.fp8.edges import deferred, wanted, with_edges
from moetron.fp8.linear import compute_dtype, wgrad
from moetron.fp8.quant import (
    TILE,
    ceil_div,
    dequantize_1x128,
    quantize_1x128,
    quantize_128x1_grouped,
)
from moetron.fp8.weight_cache import QuantizedWeights, prepared, quantized_weight


def grouped_gemm(kernel: Kernel, a, a_scales, b, b_scales, splits: list[int], out_dtype) -> torch.Tensor:
    """Rows of expert e times b[e]^T: a [N, K] FP8 (1x128), b [E, out, K] FP8 (128x128) -> [N, out]."""
    a, b = prepared(kernel, a), prepared(kernel, b)
    grouped = getattr(kernel, "grouped", None)  # the kernel's own loop over experts, if it has one
    if grouped is not None:
        return grouped(a, a_scales, b, b_scales, splits, out_dtype)
    out = torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    start = 0
    for expert, rows in enumerate(splits):
        if rows:
            part = slice(start, start + rows)
            out[part] = kernel(a[part], a_scales[part], b[expert], b_scales[expert], b_block=True,
                               out_dtype=out_dtype)
        start += rows
    return out


def grouped_wgrad(kernel: Kernel, dy_t, dy_t_scales, x_t, x_t_scales, splits: list[int], out) -> torch.Tensor:
    """out[e] = dy_e^T x_e from grouped 128x1 data (scales hold ceil(rows_e / 128) tiles per expert)."""
    dy_t, x_t = prepared(kernel, dy_t), prepared(kernel, x_t)
    grouped = getattr(kernel, "grouped_wgrad", None)
    if grouped is not None:
        return grouped(dy_t, dy_t_scales, x_t, x_t_scales, splits, out)
    row = tile = 0
    for expert, rows in enumerate(splits):
        tiles = ceil_div(rows, TILE)
        if rows:
            r, t = slice(row, row + rows), slice(tile, tile + tiles)
            out[expert] = wgrad(kernel, dy_t[r], dy_t_scales[t], x_t[r], x_t_scales[t], out.dtype)
        row, tile = row + rows, tile + tiles
    return out


def _dgrad(kernel, dy, weight, splits, p2, out_dtype, weights):
    dy_q, dy_s = quantize_1x128(dy, p2)
    wt_q, wt_s = quantized_weight(weights, weight, kernel, p2, transposed=True)  # from the FP32 W^T
    return grouped_gemm(kernel, dy_q, dy_s, wt_q, wt_s, splits, out_dtype)


def _wgrad(kernel, dy, counts, x_t, x_t_s, weight, splits, p2):
    return _wgrad_q(kernel, quantize_128x1_grouped(dy, counts, p2), (x_t, x_t_s), weight, splits)


def _wgrad_q(kernel, dy_q, x_q, weight, splits):
    """The Wgrad of `weight` from grouped 128x1 (data, scales) pairs of dy and x."""
    return grouped_wgrad(kernel, *dy_q, *x_q, splits, torch.zeros_like(weight))


class FP8GroupedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, counts, kernel, power_of_two, keep_for_wgrad, weights):
        splits, out_dtype, x_dtype = counts.tolist(), compute_dtype(x), x.dtype
        x = x.float()  # once, for both quantizations
        x_q, x_s = quantize_1x128(x, power_of_two)
        w_q, w_s = quantized_weight(weights, weight, kernel, power_of_two)
        y = grouped_gemm(kernel, x_q, x_s, w_q, w_s, splits, out_dtype)
        saved = quantize_128x1_grouped(x, counts, power_of_two) if keep_for_wgrad else (None, None)
        ctx.save_for_backward(*saved, weight, counts)
        ctx.kernel, ctx.power_of_two, ctx.splits, ctx.x_dtype = kernel, power_of_two, splits, x_dtype
        ctx.weights = weights
        return y

    @staticmethod
    def backward(ctx, dy):
        x_t, x_t_s, weight, counts = ctx.saved_tensors
        kernel, p2, splits = ctx.kernel, ctx.power_of_two, ctx.splits
        dy = dy.float()  # once, for both quantizations
        dx = _dgrad(kernel, dy, weight, splits, p2, ctx.x_dtype, ctx.weights) if wanted(ctx, 0) else None
        dw = _wgrad(kernel, dy, counts, x_t, x_t_s, weight, splits, p2) if wanted(ctx, 1) else None
        return dx, dw, None, None, None, None, None


def fp8_grouped_linear(x, weight, counts, *, kernel: Kernel, power_of_two: bool = False,
                       weights: QuantizedWeights | None = None) -> torch.Tensor:
    """y[rows of expert e] = x[rows of expert e] @ weight[e]^T with the three GEMMs in FP8."""
    keep_for_wgrad = torch.is_grad_enabled() and weight.requires_grad
    return FP8GroupedLinearFunction.apply(*with_edges(x, weight), counts, kernel, power_of_two, keep_for_wgrad,
                                          weights)


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.float().chunk(2, dim=-1)
    return F.silu(gate) * up


class FP8SwiGLUExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_up, down, counts, kernel, power_of_two, keep_for_wgrad, weights):
        p2, splits, out_dtype, x_dtype = power_of_two, counts.tolist(), compute_dtype(x), x.dtype
        x = x.float()  # once, for both quantizations
        x_q, x_s = quantize_1x128(x, p2)
        w1_q, w1_s = quantized_weight(weights, gate_up, kernel, p2)
        h = grouped_gemm(kernel, x_q, x_s, w1_q, w1_s, splits, torch.float32)
        h_q, h_s = quantize_1x128(h, p2)  # the SwiGLU input, cached in FP8
        a_q, a_s = quantize_1x128(_swiglu(h), p2)
        w2_q, w2_s = quantized_weight(weights, down, kernel, p2)
        y = grouped_gemm(kernel, a_q, a_s, w2_q, w2_s, splits, out_dtype)
        x_t, x_t_s = quantize_128x1_grouped(x, counts, p2) if keep_for_wgrad else (None, None)
        ctx.save_for_backward(x_t, x_t_s, h_q, h_s, gate_up, down, counts)
        ctx.kernel, ctx.power_of_two, ctx.splits, ctx.x_dtype = kernel, p2, splits, x_dtype
        ctx.weights, ctx.kept_for_w = weights, {}
        return y

    @staticmethod
    def backward(ctx, dy):
        x_t, x_t_s, h_q, h_s, gate_up, down, counts = ctx.saved_tensors
        kernel, p2, splits = ctx.kernel, ctx.power_of_two, ctx.splits
        dy = dy.float()  # once, for both quantizations
        want_x, want_gate_up, want_down = (wanted(ctx, i) for i in range(3))
        later_gate_up, later_down = deferred(ctx, 1), deferred(ctx, 2)
        # The 128x1 operands of the two Wgrads: kept by a B for its W, else built here when needed.
        kept, ctx.kept_for_w = ctx.kept_for_w, {}
        a_t = kept.get("a") if want_down else None
        dh_t = kept.get("dh") if want_gate_up else None
        need_a = a_t is None and (want_down or later_down)
        need_dh = dh_t is None and (want_gate_up or later_gate_up) or want_x
        if need_a or need_dh:
            gate, up = dequantize_1x128(h_q, h_s).chunk(2, dim=-1)
            sig = torch.sigmoid(gate)
        if need_a:
            a_t = quantize_128x1_grouped(gate * sig * up, counts, p2)  # the SwiGLU output, recomputed
        dh = None
        if need_dh:
            da = _dgrad(kernel, dy, down, splits, p2, torch.float32, ctx.weights)
            d_gate = da * up * sig * (1 + gate * (1 - sig))
            dh = torch.cat([d_gate, da * gate * sig], dim=-1)
            if dh_t is None and (want_gate_up or later_gate_up):
                dh_t = quantize_128x1_grouped(dh, counts, p2)
        if later_down:  # the B of a split backward: its W comes back for these
            ctx.kept_for_w["a"] = a_t
        if later_gate_up:
            ctx.kept_for_w["dh"] = dh_t
        d_down = None
        if want_down:
            d_down = _wgrad_q(kernel, quantize_128x1_grouped(dy, counts, p2), a_t, down, splits)
        d_gate_up = _wgrad_q(kernel, dh_t, (x_t, x_t_s), gate_up, splits) if want_gate_up else None
        dx = _dgrad(kernel, dh, gate_up, splits, p2, ctx.x_dtype, ctx.weights) if want_x else None
        return dx, d_gate_up, d_down, None, None, None, None, None


def fp8_swiglu_experts(x, gate_up, down, counts, *, kernel: Kernel, power_of_two: bool = False,
                       weights: QuantizedWeights | None = None):
    """down_e(silu(gate_e x) * up_e x) for rows of each expert e, gate_up [E, 2I, H], down [E, H, I];
    `weights` caches the FP8 copies of gate_up and down."""
    keep_for_wgrad = torch.is_grad_enabled() and gate_up.requires_grad
    return FP8SwiGLUExpertsFunction.apply(*with_edges(x, gate_up, down), counts, kernel, power_of_two,
                                          keep_for_wgrad, weights)


class FP8GroupedExperts(nn.Module):
    """Drop-in for moetron.model.moe.GroupedExperts (same gate_up_proj [E, 2I, H] and down_proj [E, H, I]
    parameters, same forward(x_sorted, counts)) running the expert FFN in FP8."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, backend: str = "emulated",
                 power_of_two_scales: bool = False, device=None, dtype=None):
        super().__init__()
        check_kernel_backend(backend)
        self.backend, self.power_of_two_scales = backend, power_of_two_scales
        self.quantized_weights = QuantizedWeights()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden, device=device, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate, device=device, dtype=dtype))

    @classmethod
    def from_experts(cls, experts: nn.Module, backend: str = "emulated", power_of_two_scales: bool = False):
        """Wrap a GroupedExperts, sharing its Parameter objects (no copy)."""
        num, two_i, hidden = experts.gate_up_proj.shape
        module = cls(num, hidden, two_i // 2, backend=backend, power_of_two_scales=power_of_two_scales,
                     device="meta")
        module.gate_up_proj, module.down_proj = experts.gate_up_proj, experts.down_proj
        return module

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        kernel = gemm_kernel(self.backend, x_sorted.device)
        return fp8_swiglu_experts(x_sorted, self.gate_up_proj, self.down_proj, counts, kernel=kernel,
                                  power_of_two=self.power_of_two_scales, weights=self.quantized_weights)

    def extra_repr(self) -> str:
        num, two_i, hidden = self.gate_up_proj.shape
        return (f"experts={num}, hidden={hidden}, intermediate={two_i // 2}, backend={self.backend}, "
                f"power_of_two_scales={self.power_of_two_scales}")
