"""The FP8 emulation as it was before it was made faster (moetron commit 698ae9c), kept verbatim as the
reference that tests/unit/test_fp8_emulation_bitwise.py compares the current code against bit for bit:
the quantizers and the emulated GEMM. Not used by moetron itself."""

import torch

from moetron.fp8.quant import AMAX_FLOOR, FP8_DTYPE, FP8_MAX, TILE, ceil_div


def _pad(x: torch.Tensor, dim: int, multiple: int = TILE) -> torch.Tensor:
    extra = (-x.shape[dim]) % multiple
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim)


def round_up_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= scale (exact powers of two are kept)."""
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)
    return torch.ldexp(torch.ones_like(scale), exponent)


def scales_from_amax(amax: torch.Tensor, power_of_two: bool = False) -> torch.Tensor:
    scale = amax.float().clamp(min=AMAX_FLOOR) / FP8_MAX
    return round_up_pow2(scale) if power_of_two else scale


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Saturating cast to E4M3. Clamping first makes overflow go to +-448 on every torch version
    (some versions cast out-of-range values to NaN); NaN stays NaN so a broken step stays visible."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _cut(data: torch.Tensor, sizes: dict[int, int]) -> torch.Tensor:
    """Drop the padding again (a contiguous copy only when something was padded)."""
    index = [slice(None)] * data.dim()
    padded = False
    for dim, size in sizes.items():
        if data.shape[dim] != size:
            index[dim], padded = slice(0, size), True
    return data[tuple(index)].contiguous() if padded else data


def quantize_1x128(x: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (token) per 128 columns (channels): x [..., K] -> (data [..., K], scales [..., ceil(K/128)])."""
    tiles = _pad(x.float(), -1).unflatten(-1, (-1, TILE))  # [..., Kb, 128]
    scales = scales_from_amax(tiles.abs().amax(-1), power_of_two)
    data = to_fp8(tiles / scales.unsqueeze(-1)).flatten(-2)
    return _cut(data, {data.dim() - 1: x.shape[-1]}), scales


def quantize_128x128(w: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128x128 block: w [..., N, K] -> (data [..., N, K], scales [..., ceil(N/128), ceil(K/128)])."""
    if w.dim() < 2:
        raise ValueError(f"quantize_128x128 needs a matrix (or a stack of them); got shape {tuple(w.shape)}")
    padded = _pad(_pad(w.float(), -1), -2)
    blocks = padded.unflatten(-1, (-1, TILE)).unflatten(-3, (-1, TILE))  # [..., Nb, 128, Kb, 128]
    scales = scales_from_amax(blocks.abs().amax(dim=(-3, -1)), power_of_two)
    data = to_fp8(blocks / scales[..., :, None, :, None]).flatten(-2).flatten(-3, -2)
    return _cut(data, {data.dim() - 2: w.shape[-2], data.dim() - 1: w.shape[-1]}), scales


def quantize_128x1(x: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128 rows (tokens) per column: x [M, K] -> (data [M, K], scales [ceil(M/128), K]).
    The Wgrad operands: their GEMM contracts over tokens, so the tiles run along tokens."""
    if x.dim() != 2:
        raise ValueError(f"quantize_128x1 needs a [tokens, channels] matrix; got shape {tuple(x.shape)}")
    tiles = _pad(x.float(), 0).unflatten(0, (-1, TILE))  # [Mb, 128, K]
    scales = scales_from_amax(tiles.abs().amax(1), power_of_two)
    return _cut(to_fp8(tiles / scales[:, None]).flatten(0, 1), {0: x.shape[0]}), scales


def group_tiles(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows sorted by group with counts [G]: the 128-row tile of every row, tiles restarting at each
    group's first row (so no tile mixes two experts), and the number of tiles per group [G]."""
    counts = counts.to(torch.long)
    tiles_per_group = (counts + TILE - 1) // TILE
    first_tile = torch.cumsum(tiles_per_group, 0) - tiles_per_group
    first_row = torch.cumsum(counts, 0) - counts
    group = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    local_row = torch.arange(group.numel(), device=counts.device) - first_row[group]
    return first_tile[group] + local_row // TILE, tiles_per_group


def quantize_128x1_grouped(
    x: torch.Tensor, counts: torch.Tensor, power_of_two: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """128x1 tiles within each group of rows (tokens sorted by expert, counts [E]):
    x [N, K] -> (data [N, K], scales [sum_e ceil(counts_e/128), K])."""
    tile, tiles_per_group = group_tiles(counts.to(x.device))
    amax = x.new_zeros(int(tiles_per_group.sum()), x.shape[1], dtype=torch.float32)
    amax.scatter_reduce_(0, tile[:, None].expand(-1, x.shape[1]), x.float().abs(), "amax")
    scales = scales_from_amax(amax, power_of_two)
    return to_fp8(x.float() / scales[tile]), scales


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


