"""Swap a DeepSeekV3's FP8-eligible GEMMs for FP8 modules, in place (SPEC §4).

FP8: the attention projections (q_a_proj, q_b_proj or q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj), the
dense FFN and shared-expert Linears, the MTP modules' eh_proj, and the routed experts.
High precision: the embedding, the output head, the router (`gate`), the norms and the attention core.
Parameter objects and names are kept, so state_dict keys, initialization and optimizers are unaffected.
"""

from torch import nn

from moetron.fp8.backends import TEGroupedExperts, TELinear, check_backend
from moetron.fp8.grouped import FP8GroupedExperts
from moetron.fp8.linear import FP8Linear
from moetron.model.attention import MLA
from moetron.model.mlp import SwiGLU
from moetron.model.moe import GroupedExperts, MoE
from moetron.model.mtp import MTPModule

ATTENTION_PROJECTIONS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _fp8_linear(linear: nn.Linear, backend: str, power_of_two_scales: bool) -> nn.Module:
    if backend == "te":
        return TELinear(linear, power_of_two_scales)
    return FP8Linear.from_linear(linear, backend, power_of_two_scales)


def _fp8_experts(experts: GroupedExperts, backend: str, power_of_two_scales: bool) -> nn.Module:
    if backend == "te":
        return TEGroupedExperts(experts, power_of_two_scales)
    return FP8GroupedExperts.from_experts(experts, backend, power_of_two_scales)


def fp8_targets(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every module that runs in FP8."""
    targets = []
    for module in model.modules():
        if isinstance(module, MLA):
            names = ATTENTION_PROJECTIONS
        elif isinstance(module, SwiGLU):
            names = FFN_PROJECTIONS
        elif isinstance(module, MTPModule):
            names = ("eh_proj",)
        elif isinstance(module, MoE):
            names = ("experts",)
        else:
            continue
        targets += [(module, name) for name in names if isinstance(getattr(module, name, None), nn.Module)]
    return targets


def convert_to_fp8(model: nn.Module, backend: str = "emulated", power_of_two_scales: bool = False) -> nn.Module:
    """Run the model's Linears and routed experts in FP8 on `backend` ('emulated', 'torch' or 'te').
    Modules already converted are left alone. Returns the same model. Raises ConfigError when the
    backend cannot run here."""
    check_backend(backend)
    for parent, name in fp8_targets(model):
        child = getattr(parent, name)
        if type(child) is nn.Linear:
            setattr(parent, name, _fp8_linear(child, backend, power_of_two_scales))
        elif type(child) is GroupedExperts:
            setattr(parent, name, _fp8_experts(child, backend, power_of_two_scales))
    return model
