"""The FP8 backends, chosen by `fp8.backend`, and the optional NVIDIA apex fused kernels.

- `emulated`: the exact-numerics FP32 GEMM of gemm.py, on any device.
- `torch`: the same quantization and autograd, GEMMs by torch's FP8 tensor-core kernels (CUDA only):
  block-wise 1x128 / 128x128 scales on SM90 (the recipe itself), row-wise scales on other FP8 GPUs.
- `te`: Transformer Engine's own modules under its Float8BlockScaling recipe (imported lazily).

A GEMM kernel is any callable kernel(a, a_scales, b, b_scales, *, b_block, out_dtype) -> a @ b.T with the
operand layouts of gemm.fp8_gemm, so linear.py and grouped.py run unchanged on `emulated` and `torch`.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moetron.config.errors import ConfigError, invalid
from moetron.device import is_gpu
from moetron.fp8.gemm import fp8_gemm, row_scales
from moetron.fp8.quant import TILE, dequantize_1x128, fp8_to_uint8, to_fp8, uint8_to_fp8

BACKENDS = ("emulated", "torch", "te")
VALID = ("'emulated' (any device, exact FP8 numerics with FP32 math), 'torch' (CUDA GPU with FP8 tensor "
         "cores) or 'te' (Transformer Engine installed, Hopper or newer)")

Kernel = Callable[..., torch.Tensor]


def check_backend(backend: str) -> None:
    """Fail before any work when `fp8.backend` cannot run here (raises ConfigError)."""
    if backend not in BACKENDS:
        raise invalid("fp8.backend", backend, VALID)
    if backend == "torch":
        if not torch.cuda.is_available():
            raise invalid("fp8.backend", backend, VALID,
                          "The 'torch' backend runs torch's FP8 CUDA kernels and no CUDA GPU is visible here."
                          " Use 'emulated' on CPU.")
        _check_torch_gpu(torch.device(torch.cuda.current_device()))  # an index: this process's GPU
    elif backend == "te":
        import_te()


def check_kernel_backend(backend: str) -> None:
    """For moetron's own FP8 modules, which take their GEMM kernel from `emulated` or `torch`."""
    if backend == "te":
        raise invalid("fp8.backend", backend, "'emulated' or 'torch' for moetron's FP8 modules",
                      "The 'te' backend uses Transformer Engine's modules, which moetron.train.parallelize.apply_fp8 builds.")
    check_backend(backend)


def gemm_kernel(backend: str, device: torch.device) -> Kernel:
    """The GEMM kernel of `backend` for operands on `device`."""
    if backend == "emulated":
        return fp8_gemm
    if backend != "torch":
        check_kernel_backend(backend)
    _check_torch_gpu(device)
    if torch.cuda.get_device_capability(device) == (9, 0) and _has_blockwise_scaled_mm():
        return torch_blockwise_gemm
    return torch_rowwise_gemm


def _check_torch_gpu(device: torch.device) -> None:
    if not is_gpu(device):
        raise invalid("fp8.backend", "torch", VALID,
                      f"The 'torch' backend runs torch's FP8 CUDA kernels, but the model's tensors are on "
                      f"'{device}'. Move the model to a CUDA device, or use 'emulated'.")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise invalid("fp8.backend", "torch", VALID,
                      f"This GPU (compute capability {major}.{minor}) has no FP8 tensor cores (8.9 or newer needed).")


def _has_blockwise_scaled_mm() -> bool:
    """torch's cuBLAS path for 1x128 / 128x128 scales: F.scaled_mm, and a CUDA 12.9+ build."""
    cuda = tuple(int(p) for p in (torch.version.cuda or "0.0").split(".")[:2])
    return hasattr(F, "scaled_mm") and hasattr(F, "ScalingType") and cuda >= (12, 9)


def _pad_rows_cols(data: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad FP8 data to multiples of `multiple` (through uint8: the byte 0 is +0.0)."""
    rows, cols = data.shape
    raw = F.pad(fp8_to_uint8(data.contiguous()), (0, (-cols) % multiple, 0, (-rows) % multiple))
    return uint8_to_fp8(raw)


def _pad_scale_rows(scales: torch.Tensor, rows: int) -> torch.Tensor:
    return F.pad(scales.float(), (0, 0, 0, rows - scales.shape[0]), value=1.0)


def torch_blockwise_gemm(a, a_scales, b, b_scales, *, b_block=False, out_dtype=torch.float32):
    """The recipe on SM90 tensor cores (torch's cuBLAS block-scaled GEMM). Shapes are padded to 128."""
    m, n = a.shape[0], b.shape[0]
    a, b = _pad_rows_cols(a, TILE), _pad_rows_cols(b, TILE)
    # 1x128 scales must be outer-dim-major: shape [rows, K/128], stride (1, rows).
    scale_a = _pad_scale_rows(a_scales, a.shape[0]).t().contiguous().t()
    if b_block:  # cuBLAS wants 128x128 scales as [L4, N/128], K-blocks contiguous, L4 = K/128 rounded up to 4
        kb = b_scales.shape[1]
        scale_b = F.pad(b_scales.float(), (0, (-kb) % 4), value=1.0).t()
        recipe_b = F.ScalingType.BlockWise128x128
    else:
        scale_b = _pad_scale_rows(b_scales, b.shape[0]).t().contiguous().t()
        recipe_b = F.ScalingType.BlockWise1x128
    wide = out_dtype if out_dtype in (torch.bfloat16, torch.float32) else torch.float32
    out = F.scaled_mm(a, b.t(), scale_a, F.ScalingType.BlockWise1x128, scale_b, recipe_b, output_dtype=wide)
    return out[:m, :n].to(out_dtype)


def torch_rowwise_gemm(a, a_scales, b, b_scales, *, b_block=False, out_dtype=torch.float32):
    """FP8 GPUs without a block-scaled kernel in torch: requantize with one scale per row of each operand
    and use torch._scaled_mm's row-wise mode. Coarser than the recipe (a second quantization)."""
    m, n = a.shape[0], b.shape[0]
    a_hp = dequantize_1x128(a, a_scales)
    b_hp = dequantize_1x128(b, row_scales(b_scales, n, b_block))
    a_hp, b_hp = (F.pad(t, (0, (-t.shape[1]) % 16, 0, (-t.shape[0]) % 16)) for t in (a_hp, b_hp))
    scale_a = a_hp.abs().amax(1, keepdim=True).clamp(min=1e-4) / 448.0
    scale_b = b_hp.abs().amax(1, keepdim=True).clamp(min=1e-4) / 448.0
    out = torch._scaled_mm(to_fp8(a_hp / scale_a), to_fp8(b_hp / scale_b).t(), scale_a=scale_a,
                           scale_b=scale_b.t().contiguous(), out_dtype=torch.bfloat16)
    return out[:m, :n].to(out_dtype)


def import_te():
    """transformer_engine.pytorch and its recipe module, or one clear paragraph naming `fp8.backend`."""
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common import recipe
    except (ImportError, OSError) as exc:
        raise ConfigError(
            f"Invalid value for `fp8.backend`: 'te'. Transformer Engine cannot be imported here ({exc}). "
            "The 'te' backend runs the FP8 GEMMs through Transformer Engine's te.Linear / te.GroupedLinear "
            "under its Float8BlockScaling recipe, which needs the transformer_engine[pytorch] package built "
            "for this torch and CUDA, and a Hopper-or-newer NVIDIA GPU. Install it there, or choose another "
            f"backend. Valid: {VALID}."
        ) from None
    return te, recipe


def te_recipe(recipe, power_of_two_scales: bool):
    """Float8BlockScaling in E4M3 with 1x128 activations/gradients and 128x128 weights (its defaults),
    scales FP32 or powers of two as asked."""
    built = recipe.Float8BlockScaling(fp8_format=recipe.Format.E4M3)
    if hasattr(recipe, "QParams"):  # the quantizer settings are class attributes, set per instance
        for name in ("fp8_quant_fwd_inp", "fp8_quant_fwd_weight", "fp8_quant_bwd_grad"):
            setattr(built, name, recipe.QParams(power_2_scale=power_of_two_scales, amax_epsilon=0.0))
    return built


def te_autocast(te, recipe):
    if hasattr(te, "autocast"):  # Transformer Engine 2.8+
        return te.autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


class TELinear(nn.Module):
    """te.Linear under Float8BlockScaling, keeping nn.Linear's `weight` (and `bias`) names."""

    def __init__(self, linear: nn.Linear, power_of_two_scales: bool = False):
        super().__init__()
        te, recipe = import_te()
        self._te, self._recipe = te, te_recipe(recipe, power_of_two_scales)
        inner = te.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          params_dtype=linear.weight.dtype, device=linear.weight.device)
        with torch.no_grad():
            inner.weight.copy_(linear.weight)
            if linear.bias is not None:
                inner.bias.copy_(linear.bias)
        # The same Parameter objects are registered here under nn.Linear's names; te.Linear stays an
        # unregistered helper, so state_dict keys are unchanged (no `_extra_state` entries either).
        self.weight = inner.weight
        self.bias = inner.bias if linear.bias is not None else None
        self._inner = [inner]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self._inner[0]
        inner.train(self.training)
        with te_autocast(self._te, self._recipe):
            return inner(x)


class TEGroupedExperts(nn.Module):
    """The routed experts on te.GroupedLinear, keeping the stacked gate_up_proj [E, 2I, H] and
    down_proj [E, H, I] parameters (each GEMM gets a view of its expert's slice)."""

    def __init__(self, experts: nn.Module, power_of_two_scales: bool = False):
        super().__init__()
        te, recipe = import_te()
        self._te, self._recipe = te, te_recipe(recipe, power_of_two_scales)
        self.gate_up_proj, self.down_proj = experts.gate_up_proj, experts.down_proj
        num, two_i, hidden = self.gate_up_proj.shape
        device, dtype = self.gate_up_proj.device, self.gate_up_proj.dtype
        gate_up = te.GroupedLinear(num, hidden, two_i, bias=False, params_dtype=dtype, device=device)
        down = te.GroupedLinear(num, two_i // 2, hidden, bias=False, params_dtype=dtype, device=device)
        for inner in (gate_up, down):  # their per-expert weights become views of the stacked ones
            for i in range(num):
                inner._parameters.pop(f"weight{i}", None)
        has_padding = hasattr(te, "Fp8Padding")  # FP8 GEMMs want each expert's rows aligned
        pads = (te.Fp8Padding(num), te.Fp8Unpadding(num)) if has_padding else None
        self._inner = [gate_up, down, pads]

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        gate_up, down, pads = self._inner
        gate_up.train(self.training)
        down.train(self.training)
        for i in range(self.gate_up_proj.shape[0]):
            setattr(gate_up, f"weight{i}", self.gate_up_proj[i])
            setattr(down, f"weight{i}", self.down_proj[i])
        splits = counts.tolist()
        with te_autocast(self._te, self._recipe):
            x, padded = pads[0](x_sorted, splits) if pads else (x_sorted, splits)
            gate, up = gate_up(x, padded).chunk(2, dim=-1)
            y = down(F.silu(gate) * up, padded)
            return pads[1](y, splits) if pads else y


def apex_fused_rms_norm():
    """apex's FusedRMSNorm class on CUDA when apex is installed, else None (use the torch RMSNorm)."""
    if not torch.cuda.is_available():
        return None
    try:
        from apex.normalization import FusedRMSNorm
    except (ImportError, OSError):
        return None
    return FusedRMSNorm


def apex_fused_adam():
    """apex's FusedAdam class on CUDA when apex is installed, else None (use torch's AdamW)."""
    if not torch.cuda.is_available():
        return None
    try:
        from apex.optimizers import FusedAdam
    except (ImportError, OSError):
        return None
    return FusedAdam
