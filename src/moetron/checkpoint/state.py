"""The keys of the one checkpoint format (checkpoint/store.py), from whatever part of the model a rank holds.

    model.<full-model name>                      dense parameters and persistent buffers (the routing bias)
    model.<routed-expert stack>.<id>             one expert's slice of a stacked expert tensor, id = GLOBAL id
    optim.<name>[.<id>].{exp_avg,exp_avg_sq}     AdamW moments, per parameter (per expert for stacks)
    optim.<name>.step                            AdamW's step count of the parameter
    ema.<name>[.<id>]                            the weight EMA (parallel.ema)

Names are the full model's because stages and expert blocks keep them (model/stages.py, model/moe_ep.py);
routed experts are split per global id, so the same file serves one process, any EP size and any stage split.
"""

from __future__ import annotations

import torch
from torch import nn

from moetron.model.moe import MoE


def expert_offsets(module: nn.Module) -> dict[str, int]:
    """Names (in `module`'s state dict) of routed-expert stacks -> global id of their first row."""
    offsets = {}
    for prefix, moe in module.named_modules():
        if isinstance(moe, MoE):
            for name, _ in moe.experts.named_parameters():
                offsets[f"{prefix}.experts.{name}" if prefix else f"experts.{name}"] = moe.expert_offset
    return offsets


def flat_entries(prefix: str, name: str, value: torch.Tensor, offsets: dict[str, int],
                 suffix: str = "") -> dict[str, torch.Tensor]:
    """`value` under its key, or one key per expert row (views) when `name` is a routed-expert stack."""
    if name in offsets:
        return {f"{prefix}{name}.{offsets[name] + i}{suffix}": value[i] for i in range(value.shape[0])}
    return {f"{prefix}{name}{suffix}": value}


def model_entries(module: nn.Module) -> dict[str, torch.Tensor]:
    """The model keys of `module` (a full model or a stage), values are the live tensors (views)."""
    offsets = expert_offsets(module)
    out = {}
    for name, value in module.state_dict(keep_vars=True).items():
        out.update(flat_entries("model.", name, value.detach(), offsets))
    return out
