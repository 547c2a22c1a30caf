"""Rotary position embedding for MLA's decoupled RoPE part, with YaRN context extension (arXiv 2412.19437 §2.1.1).

Pairs of adjacent dimensions (x0, x1), (x2, x3), ... are rotated by one frequency each, the layout of the
published DeepSeek-V3 weights (Hugging Face's `rope_interleave=True`).
"""

import math

import torch

from moetron.config import RopeScaling


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The dimension index whose wavelength fits `num_rotations` times into `max_pos` tokens."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inverse_frequencies(dim: int, base: float, scaling: RopeScaling) -> torch.Tensor:
    """Per-pair angular frequencies; YaRN interpolates the low frequencies and keeps the high ones."""
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if scaling.type != "yarn":
        return freqs.float()
    max_pos = scaling.original_max_position_embeddings
    low = max(math.floor(_correction_dim(scaling.beta_fast, dim, base, max_pos)), 0)
    high = min(math.ceil(_correction_dim(scaling.beta_slow, dim, base, max_pos)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: divide it by the factor
    freqs = freqs / scaling.factor * (1 - extrapolate) + freqs * extrapolate
    return freqs.float()


def rope_cos_sin(positions: torch.Tensor, dim: int, base: float, scaling: RopeScaling):
    """cos and sin of shape [S, dim/2] for integer positions [S]."""
    angles = positions.float()[:, None] * inverse_frequencies(dim, base, scaling).to(positions.device)[None, :]
    magnitude = 1.0
    if scaling.type == "yarn":
        magnitude = yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    return angles.cos() * magnitude, angles.sin() * magnitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dim of x [B, S, heads, dim] by the angles of cos/sin [S, dim/2]."""
    x_even, x_odd = x.float()[..., 0::2], x.float()[..., 1::2]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack([x_even * cos - x_odd * sin, x_odd * cos + x_even * sin], dim=-1)
    return rotated.flatten(-2).to(x.dtype)
