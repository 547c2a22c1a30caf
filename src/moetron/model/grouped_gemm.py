"""Per-expert GEMMs over tokens sorted by expert: one grouped GEMM where the backend has one,
else a loop over the non-empty experts. Never a dense all-experts product."""

import torch

from moetron.device import is_gpu, is_host


def _grouped_mm_supported(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if is_host(x.device):
        return x.dtype in (torch.float32, torch.bfloat16)
    if is_gpu(x.device):  # the CUDA kernel needs BF16 on Hopper or newer
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """y[rows of expert e] = x[rows of expert e] @ weight[e].T, for x [N, K] sorted by expert,
    weight [E, out, K] and counts [E] (rows per expert, summing to N)."""
    weight = weight.to(x.dtype)
    if _grouped_mm_supported(x):
        offsets = torch.cumsum(counts, 0).to(device=x.device, dtype=torch.int32)
        y = torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
        if y.requires_grad:  # the CPU kernel's backward rejects broadcast (stride-0) gradients
            y.register_hook(lambda grad: grad.contiguous())
        return y
    outputs = []
    for expert, rows in enumerate(x.split(counts.tolist())):
        if rows.shape[0]:
            outputs.append(rows @ weight[expert].T)
    return torch.cat(outputs) if outputs else x.new_zeros(0, weight.shape[1])
