"""Fine-grained E4M3 quantization (arXiv 2412.19437 §3.3): online amax per 1x128 activation tile, per 128x128 weight
block, per 128x1 tile along tokens (Wgrad operands); FP32 or power-of-two scales; dequantization; and
the uint8 views that carry FP8 over transports without a float8 type (gloo).

A LEAF module: torch and math only, so the expert-parallel library can use it for its wire payloads.

Conventions: a quantizer returns (data, scales). `data` is float8_e4m3fn with the input's shape (dims that
are not multiples of 128 are zero-padded inside, which leaves every amax unchanged, and cut back after);
`scales` are FP32 dequantization factors, x ~= data * scale, one per tile/block:
  1x128    x [..., K]    -> scales [..., ceil(K/128)]
  128x128  w [..., N, K] -> scales [..., ceil(N/128), ceil(K/128)]
  128x1    x [M, K]      -> scales [ceil(M/128), K]
"""

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
TILE = 128
AMAX_FLOOR = 1e-4  # the reference formula's clamp: an all-zero tile still gets a finite scale


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


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
    scale = amax.float().clamp(min=AMAX_FLOOR).div_(FP8_MAX)  # clamp's result is new: divided in place
    return round_up_pow2(scale) if power_of_two else scale


def to_fp8(x: torch.Tensor, scaled: bool = False) -> torch.Tensor:
    """Saturating cast to E4M3. Clamping first makes overflow go to +-448 on every torch version
    (some versions cast values from 464 up to NaN); NaN stays NaN so a broken step stays visible.
    scaled=True: x was divided by a scale of at least amax(|x|) / 448, so |x| is above 448 by rounding
    at most, which the cast rounds to 448 like the clamp would: the clamp (a pass over x) is skipped."""
    return x.to(FP8_DTYPE) if scaled else x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


# Every E4M3 code's value, by code: the constant table fp8_to_float looks values up in.
E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()


def fp8_to_float(data: torch.Tensor) -> torch.Tensor:
    """E4M3 data as FP32: the values and the memory layout of data.float() (a transposed matrix stays
    transposed, so a GEMM sees the same operand as before). CPU kernels convert float8 one element at a
    time; a lookup in the table of all 256 codes is several times faster."""
    if data.dtype != FP8_DTYPE:
        return data if data.dtype == torch.float32 else data.float()
    if data.dim() == 2 and not data.is_contiguous() and data.t().is_contiguous():
        return fp8_to_float(data.t()).t()
    if not data.is_contiguous():
        return data.float()
    codes = data.view(torch.uint8).reshape(-1).long()  # int64 indices: index_select 2-8x faster than with int32
    table = E4M3_VALUES if data.device == E4M3_VALUES.device else E4M3_VALUES.to(data.device)
    return table.index_select(0, codes).view(data.shape)


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
    if 0 < x.shape[-1] <= TILE:  # one tile per row: no padding
        x = x.float()
        scales = scales_from_amax(x.abs().amax(-1, keepdim=True), power_of_two)
        return to_fp8(x / scales, scaled=True), scales
    tiles = _pad(x.float(), -1).unflatten(-1, (-1, TILE))  # [..., Kb, 128]
    scales = scales_from_amax(tiles.abs().amax(-1), power_of_two)
    data = to_fp8(tiles / scales.unsqueeze(-1), scaled=True).flatten(-2)
    return _cut(data, {data.dim() - 1: x.shape[-1]}), scales


def quantize_128x128(w: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128x128 block: w [..., N, K] -> (data [..., N, K], scales [..., ceil(N/128), ceil(K/128)])."""
    if w.dim() < 2:
        raise ValueError(f"quantize_128x128 needs a matrix (or a stack of them); got shape {tuple(w.shape)}")
    padded = _pad(_pad(w.float(), -1), -2)
    blocks = padded.unflatten(-1, (-1, TILE)).unflatten(-3, (-1, TILE))  # [..., Nb, 128, Kb, 128]
    scales = scales_from_amax(blocks.abs().amax(dim=(-3, -1)), power_of_two)
    data = to_fp8(blocks / scales[..., :, None, :, None], scaled=True).flatten(-2).flatten(-3, -2)
    return _cut(data, {data.dim() - 2: w.shape[-2], data.dim() - 1: w.shape[-1]}), scales


def quantize_128x1(x: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128 rows (tokens) per column: x [M, K] -> (data [M, K], scales [ceil(M/128), K]).
    The Wgrad operands: their GEMM contracts over tokens, so the tiles run along tokens."""
    if x.dim() != 2:
        raise ValueError(f"quantize_128x1 needs a [tokens, channels] matrix; got shape {tuple(x.shape)}")
    if 0 < x.shape[0] <= TILE:  # one tile per column: no padding
        x = x.float()
        scales = scales_from_amax(x.abs().amax(0, keepdim=True), power_of_two)
        return to_fp8(x / scales, scaled=True), scales
    tiles = _pad(x.float(), 0).unflatten(0, (-1, TILE))  # [Mb, 128, K]
    scales = scales_from_amax(tiles.abs().amax(1), power_of_two)
    return _cut(to_fp8(tiles / scales[:, None], scaled=True).flatten(0, 1), {0: x.shape[0]}), scales


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
    x = x.float()
    amax.scatter_reduce_(0, tile[:, None].expand(-1, x.shape[1]), x.abs(), "amax")
    scales = scales_from_amax(amax, power_of_two)
    return to_fp8(x / scales.index_select(0, tile), scaled=True), scales


def quantize_per_tensor(x: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale for the whole tensor: the coarse baseline that fine-grained scaling improves on."""
    scale = scales_from_amax(x.float().abs().amax(), power_of_two)
    return to_fp8(x.float() / scale, scaled=True), scale


def dequantize_1x128(data: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    per_element = scales.repeat_interleave(TILE, -1)[..., : data.shape[-1]]
    return (fp8_to_float(data) * per_element).to(dtype)


def dequantize_128x128(data: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    per_element = scales.repeat_interleave(TILE, -2).repeat_interleave(TILE, -1)
    return (fp8_to_float(data) * per_element[..., : data.shape[-2], : data.shape[-1]]).to(dtype)


def dequantize_128x1(data: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (fp8_to_float(data) * scales.repeat_interleave(TILE, 0)[: data.shape[0]]).to(dtype)


def dequantize_128x1_grouped(
    data: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    tile, _ = group_tiles(counts.to(data.device))
    return (fp8_to_float(data) * scales[tile]).to(dtype)


def dequantize_per_tensor(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (fp8_to_float(data) * scale).to(dtype)


def fp8_to_uint8(data: torch.Tensor) -> torch.Tensor:
    """Reinterpret FP8 bytes as uint8 (no copy) for transports without float8 (gloo)."""
    return data.view(torch.uint8)


def uint8_to_fp8(raw: torch.Tensor) -> torch.Tensor:
    """The inverse of fp8_to_uint8 (no copy)."""
    return raw.view(FP8_DTYPE)
