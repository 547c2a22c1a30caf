"""FP8 mixed precision with fine-grained scaling (arXiv 2412.19437 §3.3): the E4M3 quantizers (quant.py, a leaf
module the expert-parallel library also uses), the emulated FP8 GEMM, FP8 Linear / grouped-expert
modules and the backends (emulated, torch, te). Which of the model's GEMMs run in FP8 is decided outside this
package (moetron.train.parallelize.apply_fp8), so fp8/ never imports the model.

Importing this package loads only the quantizers; everything else loads on first use, so importing
moetron.fp8.quant never pulls in the model (ARCHITECTURE.md: comm may use the quantizers, not the model).
"""

import importlib

from moetron.fp8.quant import (
    FP8_DTYPE,
    FP8_MAX,
    TILE,
    dequantize_1x128,
    dequantize_128x1,
    dequantize_128x1_grouped,
    dequantize_128x128,
    fp8_to_uint8,
    quantize_1x128,
    quantize_128x1,
    quantize_128x1_grouped,
    quantize_128x128,
    uint8_to_fp8,
)

_LAZY = {
    "fp8_gemm": "moetron.fp8.gemm",
    "calc_diff": "moetron.fp8.gemm",
    "FP8Linear": "moetron.fp8.linear",
    "fp8_linear": "moetron.fp8.linear",
    "FP8GroupedExperts": "moetron.fp8.grouped",
    "fp8_grouped_linear": "moetron.fp8.grouped",
    "fp8_swiglu_experts": "moetron.fp8.grouped",
    "BACKENDS": "moetron.fp8.backends",
    "check_backend": "moetron.fp8.backends",
    "apex_fused_adam": "moetron.fp8.backends",
    "apex_fused_rms_norm": "moetron.fp8.backends",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moetron.fp8' has no attribute {name!r}")


__all__ = [
    "FP8_DTYPE", "FP8_MAX", "TILE", "dequantize_1x128", "dequantize_128x1", "dequantize_128x1_grouped",
    "dequantize_128x128", "fp8_to_uint8", "quantize_1x128", "quantize_128x1", "quantize_128x1_grouped",
    "quantize_128x128", "uint8_to_fp8", *_LAZY,
]
