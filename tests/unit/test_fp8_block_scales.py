"""128x128 weight blocks each get their own scale (DeepSeek-V3 report, §3.3.1): checked against a block
loop written out by hand, on weights whose blocks differ in magnitude by up to 10^6, through the quantizer,
the FP8 Linear (forward and Dgrad) and the grouped expert GEMM. One per-tensor scale would flush the small
blocks to zero and fails every test here."""

import torch

from moetron.fp8.backends import gemm_kernel
from moetron.fp8.grouped import fp8_grouped_linear
from moetron.fp8.linear import FP8Linear
from moetron.fp8.quant import FP8_DTYPE, dequantize_128x128, quantize_128x128

B = 128
E4M3_MAX = 448.0


def blocky(rows: int, cols: int, magnitudes: list[list[float]], seed: int = 0) -> torch.Tensor:
    """randn in each 128x128 block, times that block's magnitude."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    for i, row in enumerate(magnitudes):
        for j, mag in enumerate(row):
            w[i * B:(i + 1) * B, j * B:(j + 1) * B] *= mag
    return w


def hand_blockwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp8 data, scales, dequantized) block by block: scale = max(|block|, 1e-4) / 448."""
    rows, cols = w.shape
    nb, kb = -(-rows // B), -(-cols // B)
    data = torch.empty(rows, cols, dtype=FP8_DTYPE)
    scales = torch.empty(nb, kb)
    deq = torch.empty(rows, cols, dtype=torch.float64)
    for i in range(nb):
        for j in range(kb):
            block = w[i * B:(i + 1) * B, j * B:(j + 1) * B].float()
            scale = max(float(block.abs().max()), 1e-4) / E4M3_MAX
            q = (block / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
            data[i * B:(i + 1) * B, j * B:(j + 1) * B] = q
            scales[i, j] = scale
            deq[i * B:(i + 1) * B, j * B:(j + 1) * B] = q.double() * scale
    return data, scales, deq


def hand_rowwise(x: torch.Tensor) -> torch.Tensor:
    """x quantized per 1x128 tile and dequantized, tile by tile."""
    out = torch.empty(x.shape, dtype=torch.float64)
    for r in range(x.shape[0]):
        for j in range(0, x.shape[1], B):
            tile = x[r, j:j + B].float()
            scale = max(float(tile.abs().max()), 1e-4) / E4M3_MAX
            out[r, j:j + B] = (tile / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE).double() * scale
    return out


def assert_close_per_block(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """|got - want| <= rtol x the largest |want| of the same 128 output columns (each its own magnitude)."""
    for j in range(0, want.shape[-1], B):
        scale = float(want[..., j:j + B].abs().max())
        err = float((got[..., j:j + B].double() - want[..., j:j + B]).abs().max())
        assert err <= rtol * scale, f"output columns {j}..{j + B - 1}: error {err:.3g} vs magnitude {scale:.3g}"


MAGS = [[1e-3, 1.0, 30.0], [1e3, 1e-2, 0.5]]  # six blocks, 10^-3 .. 10^3


def test_quantizer_matches_the_hand_block_loop():
    w = blocky(2 * B, 3 * B, MAGS)
    data, scales = quantize_128x128(w)
    ref_data, ref_scales, ref_deq = hand_blockwise(w)
    assert scales.shape == (2, 3)
    torch.testing.assert_close(scales, ref_scales, rtol=0, atol=0)
    assert torch.equal(data.float(), ref_data.float())
    deq = dequantize_128x128(data, scales).double()
    torch.testing.assert_close(deq, ref_deq, rtol=1e-6, atol=0)  # the product is taken in FP32 there
    for i, row in enumerate(MAGS):  # every block keeps E4M3 precision, the 1e-3 one as well as the 1e3 one
        for j, _ in enumerate(row):
            block = (slice(i * B, (i + 1) * B), slice(j * B, (j + 1) * B))
            rel = float((deq[block] - w[block].double()).norm() / w[block].double().norm())
            assert rel < 0.05, f"block ({i}, {j}): relative error {rel:.3f}"


def test_stacked_experts_get_blocks_per_expert():
    w = torch.stack([blocky(B, 2 * B, [[1e-3, 1e-3]], seed=1), blocky(B, 2 * B, [[1e3, 1.0]], seed=2)])
    data, scales = quantize_128x128(w)
    assert scales.shape == (2, 1, 2)
    for e in range(2):
        ref_data, ref_scales, _ = hand_blockwise(w[e])
        torch.testing.assert_close(scales[e], ref_scales, rtol=0, atol=0)
        assert torch.equal(data[e].float(), ref_data.float())


def fp8_linear_with(w: torch.Tensor) -> FP8Linear:
    linear = FP8Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    return linear


def test_fp8_linear_forward_uses_block_scales():
    w = blocky(2 * B, 2 * B, [[1e-3, 1e-3], [1e3, 1e3]])  # output features 0..127 tiny, 128..255 large
    x = torch.randn(5, 2 * B, generator=torch.Generator().manual_seed(3))
    y = fp8_linear_with(w)(x)
    assert_close_per_block(y, hand_rowwise(x) @ hand_blockwise(w)[2].T)


def test_fp8_linear_dgrad_uses_block_scales_of_the_transpose():
    w = blocky(2 * B, 2 * B, [[1e-3, 1e3], [1e-3, 1e3]])  # input features 0..127 tiny, 128..255 large
    x = torch.randn(5, 2 * B, generator=torch.Generator().manual_seed(4), requires_grad=True)
    dy = torch.randn(5, 2 * B, generator=torch.Generator().manual_seed(5))
    fp8_linear_with(w)(x).backward(dy)
    # dx = dy W: W^T quantized afresh in 128x128 blocks (from the FP32 weight), dy in 1x128 tiles.
    assert_close_per_block(x.grad, hand_rowwise(dy) @ hand_blockwise(w.T.contiguous())[2].T)


def test_grouped_expert_gemm_uses_block_scales_per_expert():
    w = torch.stack([blocky(B, B, [[1e-3]], seed=4), blocky(B, B, [[1e3]], seed=5)])
    counts = torch.tensor([3, 4])
    x = torch.randn(7, B, generator=torch.Generator().manual_seed(6))
    y = fp8_grouped_linear(x, w, counts, kernel=gemm_kernel("emulated", x.device))
    deq_x = hand_rowwise(x)
    expected = torch.cat([deq_x[:3] @ hand_blockwise(w[0])[2].T, deq_x[3:] @ hand_blockwise(w[1])[2].T])
    for rows in (slice(0, 3), slice(3, 7)):  # each expert's rows at their own magnitude
        assert_close_per_block(y[rows], expected[rows])
