"""Turn the single-device model into this rank's part of the layout, from outside (torchtitan's habit).

    stages = parallelize(model, mesh, config, transport)

is a short list of apply_* steps, each a plain function over modules:
  apply_stage_split      keep the pipeline stages this rank holds in the schedule (DualPipe: two copies)
  apply_tied_embeddings  the last stage's MTP embedding IS stage 0's where one rank holds both ends
  apply_expert_parallel  each MoE keeps this EP rank's block of experts and routes tokens over the EP group
  apply_fp8              FP8 GEMMs (arXiv 2412.19437 §3.3) for this rank's Linears and its expert block
  apply_recompute        selective recompute of the norms and the MLA up-projections (§3.2.3)
One process is the layout pp = dp = ep = 1: one stage holding the whole model, nothing sharded.

The trainer builds the full model on the meta device (no memory), parallelizes it there, and `materialize`
allocates only what this rank kept, on the run's device, in the parameters' dtype, and initializes it with
per-tensor generators (model/init.py): every layout starts from the weights one process would have.
"""

from __future__ import annotations

import torch
from torch import nn

from moetron.comm import Transport
from moetron.config import MoetronConfig
from moetron.model import DeepSeekV3
from moetron.model.attention import MLA
from moetron.model.init import init_parameters
from moetron.model.mlp import SwiGLU
from moetron.model.moe import GroupedExperts, MoE
from moetron.model.moe_ep import apply_expert_parallel
from moetron.model.mtp import MTPModule
from moetron.model.stages import PipelineStage, apply_selective_recompute, share_embedding
from moetron.parallel import ProcessMesh, StageId, build_schedule


class StagedModel(nn.Module):
    """This rank's stage copies, by StageId; names inside each stage are the full model's."""

    def __init__(self, stages: dict[StageId, PipelineStage], num_stages: int, placement: dict[StageId, int]):
        super().__init__()
        self.stage_ids = sorted(stages)
        self.num_stages, self.placement = num_stages, placement  # placement: stage copy -> pipeline rank
        self.stages = nn.ModuleDict({f"s{s.stage}d{s.direction}": stages[s] for s in self.stage_ids})

    def stage(self, sid: StageId) -> PipelineStage:
        return self.stages[f"s{sid.stage}d{sid.direction}"]

    def by_id(self) -> dict[StageId, PipelineStage]:
        return {sid: self.stage(sid) for sid in self.stage_ids}

    def holds(self, stage: int) -> bool:
        return any(sid.stage == stage for sid in self.stage_ids)

    def unique_modules(self, kind: type) -> list[nn.Module]:
        """Modules of `kind` once each (DualPipe's two copies of a stage are different modules)."""
        seen, found = set(), []
        for stage in self.stages.values():
            for m in stage.modules():
                if isinstance(m, kind) and id(m) not in seen:
                    seen.add(id(m))
                    found.append(m)
        return found

    def moe_layers(self) -> list[MoE]:
        return self.unique_modules(MoE)


def parallelize(model: DeepSeekV3, mesh: ProcessMesh, config: MoetronConfig, transport: Transport) -> StagedModel:
    par, fp8 = config.parallel, config.fp8
    shape = build_schedule(par.schedule, par.pp, 2 * par.pp)  # the stage placement (any micro-batch count)
    stages = apply_stage_split(model, shape.num_stages, shape.stages_of(mesh.coords["pp"]))
    apply_tied_embeddings(stages, shape.num_stages)
    if par.ep > 1:  # with fp8 on, the dispatch payload travels in E4M3 (§3.3)
        for stage in stages.values():
            apply_expert_parallel(stage, mesh.ep, par.ep_dispatch, fp8_dispatch=fp8.enabled, transport=transport)
    if fp8.enabled:  # after the sharding (this rank's expert block gets the FP8 grouped GEMMs), before recompute
        for stage in stages.values():
            apply_fp8(stage, fp8.backend, fp8.power_of_two_scales)
    if par.recompute:
        for stage in stages.values():
            apply_selective_recompute(stage)
    return StagedModel(stages, shape.num_stages, dict(shape.placement))


@torch.no_grad()
def materialize(model: StagedModel, device: torch.device, seed: int, std: float,
                param_dtype: torch.dtype = torch.float32) -> StagedModel:
    """Allocate this rank's meta parameters on `device` in `param_dtype` (buffers keep their own dtype) and
    initialize them as one process would (model/init.py). Parameters shared between modules (the embedding
    of the MTP modules) stay one Parameter."""
    converted: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != param_dtype:
                if id(p) not in converted:
                    converted[id(p)] = nn.Parameter(p.to(param_dtype), requires_grad=p.requires_grad)
                module._parameters[name] = converted[id(p)]
    model.to_empty(device=device)
    for stage in model.stages.values():
        init_parameters(stage, seed, std)
    return model


def apply_stage_split(model: DeepSeekV3, num_stages: int, mine: list[StageId]) -> dict[StageId, PipelineStage]:
    return {sid: PipelineStage(model, sid.stage, num_stages) for sid in mine}


def apply_tied_embeddings(stages: dict[StageId, PipelineStage], num_stages: int) -> None:
    """One rank holding stage 0 and the last stage (DualPipe, DualPipeV, one process): the MTP modules use
    stage 0's embedding Parameter itself. Elsewhere the copies' gradients are summed by the trainer."""
    firsts = [s for sid, s in stages.items() if sid.stage == 0]
    lasts = [s for sid, s in stages.items() if sid.stage == num_stages - 1]
    if firsts and lasts and num_stages > 1:
        share_embedding(firsts[0], lasts[0])


# ------------------------------------------------------------------------------------------------- FP8
ATTENTION_PROJECTIONS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def fp8_targets(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every module that runs in FP8 (§3.3): the attention projections, the dense
    and shared-expert FFNs, the MTP modules' eh_proj and the routed experts. The embedding, the output head,
    the router, the norms and the attention core stay in high precision."""
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


def apply_fp8(model: nn.Module, backend: str = "emulated", power_of_two_scales: bool = False) -> nn.Module:
    """Run `model`'s FP8-eligible GEMMs in FP8 on `backend` ('emulated', 'torch' or 'te'), in place, keeping
    the Parameter objects (names, initialization and optimizers are unaffected). Modules already converted
    are left alone. Raises ConfigError when the backend cannot run here."""
    from moetron.fp8.backends import TEGroupedExperts, TELinear, check_backend
    from moetron.fp8.grouped import FP8GroupedExperts
    from moetron.fp8.linear import FP8Linear

    check_backend(backend)
    for parent, name in fp8_targets(model):
        child = getattr(parent, name)
        if type(child) is nn.Linear:
            fp8 = TELinear(child, power_of_two_scales) if backend == "te" else \
                FP8Linear.from_linear(child, backend, power_of_two_scales)
        elif type(child) is GroupedExperts:
            fp8 = TEGroupedExperts(child, power_of_two_scales) if backend == "te" else \
                FP8GroupedExperts.from_experts(child, backend, power_of_two_scales)
        else:
            continue
        setattr(parent, name, fp8)
    return model

