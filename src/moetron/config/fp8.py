"""Typed configuration of FP8 training (arXiv 2412.19437 §3.3)."""

from dataclasses import dataclass


@dataclass
class FP8Config:
    enabled: bool = False  # false: plain FP32/BF16 (train.precision)
    backend: str = "emulated"  # emulated (any device, exact quantization numerics) | torch | te (CUDA)
    power_of_two_scales: bool = False  # round every scale up to 2^k


def validate_fp8(fp8: FP8Config) -> None:
    """The backend check is lazy (it may import Transformer Engine), so it runs only when FP8 is on."""
    if fp8.enabled:
        from moetron.fp8.backends import check_backend

        check_backend(fp8.backend)
