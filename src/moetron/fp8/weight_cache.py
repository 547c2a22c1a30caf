"""FP8 copies of a module's weights, quantized once per weight version instead of once per GEMM.

A weight changes only when the optimizer (or a checkpoint load, or a rollback) writes it, but every
micro-batch's forward quantizes W (128x128 blocks) and every backward quantizes W^T again, and the emulated
GEMM decodes each copy back to FP32 each time. With micro-batches of one sequence, as a pipeline runs
them, the weights are larger than the activations and those passes dominate the FP8 cost. Transformer
Engine caches its FP8 weights across the micro-batches of a step for the same reason.

A copy belongs to one Parameter object (a weak reference: a replaced Parameter is quantized afresh) at one
value of its version counter, which every in-place write bumps (optimizer steps, `copy_` from a checkpoint
or a ZeRO all-gather), so a changed weight is quantized again.
The copies are in the form the kernel multiplies (`kernel.prepare`, FP32 for the emulated GEMM), bit for
bit what quantizing on every call gives.
"""

import weakref

import torch

from moetron.fp8.quant import TILE, quantize_128x128


def prepared(kernel, data: torch.Tensor) -> torch.Tensor:
    """An operand in the form `kernel` multiplies, converted once (kernel.prepare, if any)."""
    prepare = getattr(kernel, "prepare", None)
    return data if prepare is None else prepare(data)


class QuantizedWeights:
    """Per weight (and per orientation: W for Fprop, W^T for Dgrad): its 128x128-quantized copy while
    the weight is unchanged."""

    def __init__(self):
        self._copies: dict[tuple[int, bool], tuple] = {}  # slot -> (parameter ref, version, copy)

    def __deepcopy__(self, memo):  # a copied module has other weights: start empty
        return QuantizedWeights()

    def get(self, weight: torch.Tensor, kernel, power_of_two: bool, transposed: bool = False):
        """(data, scales) of quantize_128x128(W or W^T), data in the kernel's form. `weight` may be a view
        of the Parameter (the Functions receive one, see edges.py): the copy belongs to the Parameter."""
        param = weight._base if weight._base is not None else weight
        slot = (id(param), transposed)
        version = (param._version, weight.shape, weight.dtype, power_of_two, kernel)
        cached = self._copies.get(slot)
        if cached is not None and cached[0]() is param and cached[1] == version:
            return cached[2]
        if transposed:
            copy = transpose(*self.get(weight, kernel, power_of_two))
        else:
            data, scales = quantize_128x128(weight, power_of_two)
            copy = (prepared(kernel, data), scales)
        self._copies[slot] = (weakref.ref(param), version, copy)
        return copy


def transpose(data: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_128x128(W^T) from (data, scales) = quantize_128x128(W), bit for bit and in its layout: a
    transposed view of W's data when no dim was padded, else a contiguous copy (the padded path cuts and
    copies); contiguous scales."""
    data_t = data.transpose(-2, -1)
    if data.shape[-2] % TILE or data.shape[-1] % TILE:
        data_t = data_t.contiguous()
    return data_t, scales.transpose(-2, -1).contiguous()


def quantized_weight(cache: QuantizedWeights | None, weight, kernel, power_of_two: bool, transposed=False):
    """From the cache when there is one, else quantized now (a Function called without a module)."""
    if cache is None:
        return quantize_128x128(weight.transpose(-2, -1) if transposed else weight, power_of_two)
    return cache.get(weight, kernel, power_of_two, transposed)
