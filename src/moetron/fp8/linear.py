"""FP8 Linear (arXiv 2412.19437 §3.3): all three GEMMs in FP8 with fine-grained scales.

  Fprop  y  = x  W^T    x: 1x128 tiles,               W:   128x128 blocks
  Dgrad  dx = dy W      dy: 1x128 tiles,              W^T: 128x128 blocks, quantized from the FP32 W^T
  Wgrad  dW = dy^T x    dy and x: 128x1 tiles along tokens (the contracted dim)

Only FP8 copies of the input are kept for backward: x quantized along tokens for Wgrad, taken from the
high-precision x in forward (never by transposing the 1x128 copy), plus its scales.

Dgrad and Wgrad run only when the backward asks for them (edges.py): a split backward runs Dgrad in B
and Wgrad in its deferred W, from the same saved FP8 x and the gradient the split keeps for W.
"""

import torch
from torch import nn

from moetron.fp8.backends import Kernel, check_kernel_backend, gemm_kernel
from moetron.fp8.edges import wanted, with_edges
from moetron.fp8.quant import quantize_1x128, quantize_128x1
from moetron.fp8.weight_cache import QuantizedWeights, quantized_weight


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What nn.Linear would return here: the autocast dtype inside autocast, else x's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def wgrad(kernel: Kernel, dy_t, dy_t_scales, x_t, x_t_scales, out_dtype) -> torch.Tensor:
    """dW = dy^T x from 128x1-quantized dy [M, N] and x [M, K]: a GEMM whose K is the token dim."""
    return kernel(dy_t.t(), dy_t_scales.t(), x_t.t(), x_t_scales.t(), b_block=False, out_dtype=out_dtype)


class FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, kernel, power_of_two, keep_for_wgrad, weights):
        rows = x.reshape(-1, x.shape[-1]).float()  # once, for both quantizations
        out_dtype = compute_dtype(x)
        x_q, x_s = quantize_1x128(rows, power_of_two)
        w_q, w_s = quantized_weight(weights, weight, kernel, power_of_two)
        y = kernel(x_q, x_s, w_q, w_s, b_block=True, out_dtype=out_dtype)
        if bias is not None:
            y = y + bias.to(out_dtype)
        saved = quantize_128x1(rows, power_of_two) if keep_for_wgrad else (None, None)
        ctx.save_for_backward(*saved, weight)
        ctx.kernel, ctx.power_of_two, ctx.weights = kernel, power_of_two, weights
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x_t, x_t_s, weight = ctx.saved_tensors
        kernel, p2 = ctx.kernel, ctx.power_of_two
        dy = grad_out.reshape(-1, grad_out.shape[-1]).float()  # once, for every use below
        dx = dw = db = None
        if wanted(ctx, 0):
            dy_q, dy_s = quantize_1x128(dy, p2)
            wt_q, wt_s = quantized_weight(ctx.weights, weight, kernel, p2, transposed=True)  # from the FP32 W^T
            dx = kernel(dy_q, dy_s, wt_q, wt_s, b_block=True, out_dtype=ctx.x_dtype).view(ctx.x_shape)
        if wanted(ctx, 1):
            dy_t, dy_t_s = quantize_128x1(dy, p2)
            dw = wgrad(kernel, dy_t, dy_t_s, x_t, x_t_s, weight.dtype)
        if ctx.bias_dtype is not None and wanted(ctx, 2):
            db = dy.sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None


def fp8_linear(x, weight, bias=None, *, kernel: Kernel, power_of_two: bool = False,
               weights: QuantizedWeights | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) with the three GEMMs in FP8; `weights` caches W's FP8 copies."""
    keep_for_wgrad = torch.is_grad_enabled() and weight.requires_grad
    return FP8LinearFunction.apply(*with_edges(x, weight, bias), kernel, power_of_two, keep_for_wgrad, weights)


class FP8Linear(nn.Linear):
    """Drop-in for nn.Linear (same `weight` / `bias` parameters, so checkpoints are unchanged) whose
    GEMMs run in FP8 on the `emulated` or `torch` backend."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *,
                 backend: str = "emulated", power_of_two_scales: bool = False):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        check_kernel_backend(backend)  # fail at construction, not at the first forward
        self.backend, self.power_of_two_scales = backend, power_of_two_scales
        self.quantized_weights = QuantizedWeights()

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "emulated", power_of_two_scales: bool = False):
        """Wrap an existing nn.Linear, sharing its Parameter objects (no copy)."""
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                     backend=backend, power_of_two_scales=power_of_two_scales)
        module.weight, module.bias = linear.weight, linear.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = gemm_kernel(self.backend, x.device)
        return fp8_linear(x, self.weight, self.bias, kernel=kernel, power_of_two=self.power_of_two_scales,
                          weights=self.quantized_weights)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend}, power_of_two_scales={self.power_of_two_scales}"
