"""The emulated fine-grained FP8 GEMM: exact quantization numerics, FP32 math, any device.

It follows the Hopper recipe of arXiv 2412.19437 §3.3: the FP8 products of one 128-wide chunk of K are summed, then
that partial sum is promoted into an FP32 accumulator with the chunk's scales multiplied in (the
activation tile's scale per row, the weight block's scale per output column). Products of two E4M3
values are exact in FP32, so only the FP32 sums round: the result is what an ideal FP8 kernel with FP32
promotion every 128 of K computes.
"""

import torch

from moetron.fp8.quant import TILE, ceil_div


def row_scales(b_scales: torch.Tensor, rows: int, block: bool) -> torch.Tensor:
    """Scales of b per row per 128 of K: 128x128 block scales [ceil(N/128), Kb] are repeated over the
    block's rows; 1x128 scales [N, Kb] already are per row."""
    return b_scales.repeat_interleave(TILE, 0)[:rows] if block else b_scales


def fp8_gemm(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    b: torch.Tensor,
    b_scales: torch.Tensor,
    *,
    b_block: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """a @ b.T for FP8 a [M, K] with 1x128 scales [M, ceil(K/128)] and FP8 b [N, K] with 1x128 scales
    [N, ceil(K/128)] or, with b_block=True, 128x128 scales [ceil(N/128), ceil(K/128)]. Returns [M, N]."""
    (m, k), n = a.shape, b.shape[0]
    kb = ceil_div(k, TILE)
    if b.shape[1] != k or a_scales.shape != (m, kb):
        raise ValueError(f"fp8_gemm: a {tuple(a.shape)} with scales {tuple(a_scales.shape)} does not match "
                         f"b {tuple(b.shape)} (expected a scales {(m, kb)})")
    b_rows = row_scales(b_scales, n, b_block)
    if b_rows.shape != (n, kb):
        raise ValueError(f"fp8_gemm: b scales {tuple(b_scales.shape)} do not fit b {tuple(b.shape)} "
                         f"(b_block={b_block})")
    with torch.autocast(a.device.type, enabled=False):  # the math is FP32 whatever autocast says
        a32, b32 = a.float(), b.float()
        a_scales, b_rows = a_scales.float(), b_rows.float()
        out = None
        for chunk in range(kb):  # promotion every 128 of K
            cols = slice(chunk * TILE, (chunk + 1) * TILE)
            partial = (a32[:, cols] @ b32[:, cols].T).mul_(a_scales[:, chunk, None]).mul_(b_rows[:, chunk])
            out = partial if out is None else out.add_(partial)
    return out.to(out_dtype) if out is not None else a32.new_zeros(m, n, dtype=out_dtype)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2 sum(xy) / sum(x^2 + y^2): 0 for equal tensors, ~ |x - y|^2 / (2 |x|^2) for close ones."""
    x, y = x.detach().double(), y.detach().double()
    denominator = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denominator) if denominator > 0 else 0.0
