"""The emulated fine-grained FP8 GEMM: exact quantization numerics, FP32 math, any device.

It follows the Hopper recipe of arXiv 2412.19437 §3.3: the FP8 products of one 128-wide chunk of K are summed, then
that partial sum is promoted into an FP32 accumulator with the chunk's scales multiplied in (the
activation tile's scale per row, the weight block's scale per output column). Products of two E4M3
values are exact in FP32, so only the FP32 sums round: the result is what an ideal FP8 kernel with FP32
promotion every 128 of K computes.

`fp8_gemm.prepare` turns an FP8 operand into the FP32 the GEMM multiplies (`fp8_to_float`), so a grouped
GEMM converts its operands once rather than once per expert; the GEMM takes either form.
`fp8_gemm.grouped` / `fp8_gemm.grouped_wgrad` run grouped.py's per-expert loops with the per-call work
(checks, conversions, per-row scales, the autocast switch) done once: with short sequences most experts
get a few rows and that work cost more than their GEMMs. Experts are never batched into one GEMM: BLAS
sums a row's products in another order for another number of rows (M of 1 to 3 differ), so every expert
keeps its own GEMM of its own shape.
"""

import torch

from moetron.fp8.quant import TILE, ceil_div, fp8_to_float


def row_scales(b_scales: torch.Tensor, rows: int, block: bool) -> torch.Tensor:
    """Scales of b per row per 128 of K: 128x128 block scales [..., ceil(N/128), Kb] are repeated over the
    block's rows; 1x128 scales [N, Kb] already are per row."""
    if not block:
        return b_scales
    *lead, blocks, kb = b_scales.shape  # each block row's scales repeated over its 128 rows (a broadcast, then one copy)
    if blocks == 1 and rows <= TILE:  # one block row: the broadcast view alone, no copy
        return b_scales.expand(*lead, rows, kb)
    per_row = b_scales.unsqueeze(-2).expand(*lead, blocks, TILE, kb).reshape(*lead, blocks * TILE, kb)
    return per_row[..., :rows, :]


class fp32_math:  # noqa: N801 (used like torch.autocast)
    """A context in which the GEMM math stays FP32 whatever autocast says: autocast's enabled flag, switched
    off and back. torch.autocast(enabled=False) does the same (plus dtype, cache and nesting bookkeeping that
    a region without autocast ops does not need) at several times the cost of a small GEMM."""

    __slots__ = ("device", "was_on")

    def __init__(self, device: torch.device):
        self.device = device.type

    def __enter__(self):
        self.was_on = torch.is_autocast_enabled(self.device)
        if self.was_on:
            torch.set_autocast_enabled(self.device, False)

    def __exit__(self, *exc):
        if self.was_on:
            torch.set_autocast_enabled(self.device, True)


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
    [N, ceil(K/128)] or, with b_block=True, 128x128 scales [ceil(N/128), ceil(K/128)]. Returns [M, N].
    a and b may also be given as fp8_gemm.prepare made them (FP32 holding E4M3 values)."""
    (m, k), n = a.shape, b.shape[0]
    kb = ceil_div(k, TILE)
    if b.shape[1] != k or a_scales.shape != (m, kb):
        raise ValueError(f"fp8_gemm: a {tuple(a.shape)} with scales {tuple(a_scales.shape)} does not match "
                         f"b {tuple(b.shape)} (expected a scales {(m, kb)})")
    b_rows = row_scales(b_scales, n, b_block)
    if b_rows.shape != (n, kb):
        raise ValueError(f"fp8_gemm: b scales {tuple(b_scales.shape)} do not fit b {tuple(b.shape)} "
                         f"(b_block={b_block})")
    a32, b32 = fp8_to_float(a), fp8_to_float(b)
    a_scales, b_rows = _fp32(a_scales), _fp32(b_rows)
    if kb == 0:
        return a32.new_zeros(m, n, dtype=out_dtype)
    with fp32_math(a.device):
        return _promoted(a32, a_scales, b32, b_rows, kb).to(out_dtype)


def grouped_fp8_gemm(a, a_scales, b, b_scales, splits: list[int], out_dtype: torch.dtype) -> torch.Tensor:
    """Rows of expert e times b[e]^T: a [N, K] (1x128 scales), b [E, out, K] (128x128 scales [E, ., .]),
    rows sorted by expert with splits [E] -> [N, out]. Each expert's GEMM is fp8_gemm's on the same operand
    views, bit for bit; the checks, FP32 conversions, per-row scales and the autocast switch are done once
    for all experts rather than once per expert (with short sequences most experts get a few rows)."""
    (m, k), (experts, n) = a.shape, b.shape[:2]
    kb = ceil_div(k, TILE)
    if b.shape[2] != k or a_scales.shape != (m, kb) or len(splits) != experts or sum(splits) != m:
        raise ValueError(f"grouped_fp8_gemm: a {tuple(a.shape)} (scales {tuple(a_scales.shape)}), b "
                         f"{tuple(b.shape)} and splits {splits} do not match")
    if kb == 0:
        return torch.zeros(m, n, dtype=out_dtype, device=a.device)
    a32, b32 = fp8_to_float(a), fp8_to_float(b)
    a_scales, b_rows = _fp32(a_scales), _fp32(row_scales(b_scales, n, True))
    if kb == 1:
        with fp32_math(a.device):
            return _one_chunk_grouped(a32, a_scales, b32, b_rows, splits).to(out_dtype)
    out = torch.zeros(m, n, dtype=out_dtype, device=a.device)
    start = 0
    with fp32_math(a.device):
        for expert, rows in enumerate(splits):
            if rows:
                part = slice(start, start + rows)
                out[part] = _promoted(a32[part], a_scales[part], b32[expert], b_rows[expert], kb)
            start += rows
    return out


def _one_chunk_grouped(a32, a_scales, b32, b_rows, splits: list[int]) -> torch.Tensor:
    """grouped_fp8_gemm when K is one chunk: each expert's product written in place, then the scales
    multiplied in for all rows at once, in _promoted's order (the activation's, then the weight's)."""
    out = a32.new_empty(a32.shape[0], b32.shape[1])
    start = 0
    for expert, rows in enumerate(splits):
        if rows:
            torch.mm(a32[start : start + rows], b32[expert].T, out=out[start : start + rows])
            start += rows
    counts = torch.tensor(splits, device=out.device)
    return out.mul_(a_scales).mul_(b_rows[:, :, 0].repeat_interleave(counts, 0, output_size=out.shape[0]))


def _promoted(a32, a_scales, b32, b_rows, kb: int) -> torch.Tensor:
    if kb == 1:  # the whole of K is one chunk (slicing it out would give the same operands)
        return (a32 @ b32.T).mul_(a_scales).mul_(b_rows[:, 0])
    if a32.shape[1] == kb * TILE:  # whole chunks: one batched GEMM, each chunk's operands as below
        partials = torch.bmm(a32.unflatten(1, (kb, TILE)).transpose(0, 1), b32.unflatten(1, (kb, TILE)).permute(1, 2, 0))
        partials.mul_(a_scales.t().unsqueeze(-1)).mul_(b_rows.t().unsqueeze(1))
        out = partials[0]
        for chunk in range(1, kb):  # promoted in order, as one chunk at a time would be
            out.add_(partials[chunk])
        return out
    out, b32_t = None, b32.T
    for chunk in range(kb):  # promotion every 128 of K
        cols = slice(chunk * TILE, (chunk + 1) * TILE)
        partial = (a32[:, cols] @ b32_t[cols]).mul_(a_scales[:, chunk : chunk + 1])
        partial.mul_(b_rows[:, chunk])
        out = partial if out is None else out.add_(partial)
    return out


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def grouped_fp8_wgrad(dy_t, dy_t_scales, x_t, x_t_scales, splits: list[int], out: torch.Tensor) -> torch.Tensor:
    """out[e] = dy_e^T x_e from rows sorted by expert, 128x1-quantized with tiles restarting at each expert
    (scales hold ceil(rows_e / 128) tiles per expert): each expert's GEMM is fp8_gemm's on the transposed
    views linear.wgrad passes it, bit for bit, with the per-call work done once for all experts."""
    if dy_t.shape[0] != x_t.shape[0] or sum(splits) != dy_t.shape[0] or len(splits) != out.shape[0]:
        raise ValueError(f"grouped_fp8_wgrad: dy {tuple(dy_t.shape)}, x {tuple(x_t.shape)}, splits {splits} "
                         f"and out {tuple(out.shape)} do not match")
    a32, b32 = fp8_to_float(dy_t), fp8_to_float(x_t)
    a_scales, b_scales = _fp32(dy_t_scales), _fp32(x_t_scales)
    in_place = out.dtype == torch.float32
    one_tile, row, tile = [], 0, 0  # experts whose products await their scales: (expert, its tile)
    with fp32_math(out.device):
        for expert, rows in enumerate(splits):
            tiles = ceil_div(rows, TILE)
            r, t = slice(row, row + rows), slice(tile, tile + tiles)
            if tiles == 1 and in_place:  # _promoted's one-chunk product, scaled below with the others
                torch.mm(a32[r].t(), b32[r].t().T, out=out[expert])
                one_tile.append((expert, tile))
            elif rows:
                out[expert] = _promoted(a32[r].t(), a_scales[t].t(), b32[r].t(), b_scales[t].t(), tiles)
            row, tile = row + rows, tile + tiles
    if one_tile:  # in _promoted's order: dy's scale per output row, then x's per output column
        experts, tiles = (torch.tensor(i, device=out.device) for i in zip(*one_tile, strict=True))
        out[experts] = out[experts].mul_(a_scales[tiles].unsqueeze(-1)).mul_(b_scales[tiles].unsqueeze(-2))
    return out


fp8_gemm.prepare = fp8_to_float
fp8_gemm.grouped = grouped_fp8_gemm  # grouped.py's loops over experts, done by the kernel when it has them
fp8_gemm.grouped_wgrad = grouped_fp8_wgrad


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2 sum(xy) / sum(x^2 + y^2): 0 for equal tensors, ~ |x - y|^2 / (2 |x|^2) for close ones."""
    x, y = x.detach().double(), y.detach().double()
    denominator = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denominator) if denominator > 0 else 0.0
