"""Split a DeepSeekV3 into pipeline stages (applied from outside, as torchtitan does).

Stage s holds a contiguous block of the Transformer layers; stage 0 also holds the embedding, the last
stage the final norm, the output head and the MTP modules. Every parameter keeps its name in the full
model (`layers.3.mlp.gate.weight`, `mtp.0.eh_proj.weight`), so state dicts of stages are slices of the
full model's state dict and checkpoints do not depend on the split.

The MTP modules embed the tokens t_{i+k}, so the last stage needs the embedding too: `share_embedding`
makes it the very Parameter of stage 0 when one rank holds both ends (DualPipe, DualPipeV); otherwise the
last stage keeps a copy whose gradient the trainer sums with stage 0's (as Megatron does for tied
embeddings).

The last stage returns a `LastStageOutput` (its hidden state and itself) rather than a tensor: the
pipeline hands it to the loss function only, which calls `stage.losses(...)`, so the head and the MTP
modules are parameters of the stage (their gradients are summed across DualPipe's two copies).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from moetron.config.errors import invalid
from moetron.model.moe import MoE
from moetron.model.rope import rope_cos_sin
from moetron.model.transformer import DeepSeekV3, cross_entropy, multi_token_loss


def layer_ranges(num_layers: int, num_stages: int, mtp_modules: int = 0) -> list[range]:
    """Contiguous runs of Transformer layers, as even as possible counting each MTP module as a layer of the
    last stage; the remainder goes to the middle stages first, since the first and last stages also hold
    the embedding and the output head. Every stage keeps at least one Transformer layer."""
    if num_layers < num_stages:
        raise invalid("parallel.pp", num_stages,
                      f"at most model.num_hidden_layers ({num_layers}) pipeline stages",
                      "Every stage holds at least one Transformer layer (DualPipeV has 2 x pp stages).")
    base, extra = divmod(num_layers + mtp_modules, num_stages)
    sizes = [base] * num_stages
    ends = (0, num_stages - 1)
    for s in sorted(range(num_stages), key=lambda s: (s in ends, abs(s - (num_stages - 1) / 2)))[:extra]:
        sizes[s] += 1
    sizes[-1] -= mtp_modules
    while sizes[-1] < 1:  # the MTP modules alone would fill the last stage: it takes a layer back
        donor = max(range(num_stages - 1), key=lambda s: (sizes[s], s))
        sizes[donor] -= 1
        sizes[-1] += 1
    ranges, start = [], 0
    for n in sizes:
        ranges.append(range(start, start + n))
        start += n
    return ranges


def stages_holding(name: str, num_layers: int, num_stages: int, mtp_modules: int) -> set[int]:
    """The stages whose PipelineStage holds the full-model tensor `name` (arithmetic, no model needed): the
    embedding is stage 0's (and the last stage's, for MTP), a layer's is its stage's, the rest the last's."""
    last = num_stages - 1
    if name.startswith("embed_tokens."):
        return {0, last} if mtp_modules else {0}
    if name.startswith("layers."):
        layer = int(name.split(".")[1])
        return {s for s, r in enumerate(layer_ranges(num_layers, num_stages, mtp_modules)) if layer in r}
    return {last}


@dataclass
class LastStageOutput:
    hidden: torch.Tensor
    stage: PipelineStage


class PipelineStage(nn.Module):
    def __init__(self, model: DeepSeekV3, stage: int, num_stages: int, with_mtp_embedding: bool = True):
        super().__init__()
        self.cfg = model.cfg
        self.stage, self.num_stages = stage, num_stages
        self.first, self.last = stage == 0, stage == num_stages - 1
        self.layer_ids = list(layer_ranges(model.cfg.num_hidden_layers, num_stages, len(model.mtp))[stage])
        needs_embedding = self.first or (self.last and len(model.mtp) > 0 and with_mtp_embedding)
        if needs_embedding:
            self.embed_tokens = copy.deepcopy(model.embed_tokens)
        self.layers = nn.ModuleDict({str(i): copy.deepcopy(model.layers[i]) for i in self.layer_ids})
        if self.last:
            self.norm = copy.deepcopy(model.norm)
            self.lm_head = copy.deepcopy(model.lm_head)
            self.mtp = copy.deepcopy(model.mtp)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def rope(self, seq_len: int, device: torch.device):
        positions = torch.arange(seq_len, device=device)
        return rope_cos_sin(positions, self.cfg.qk_rope_head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)

    def forward(self, x: torch.Tensor):
        """Stage 0: tokens [B, S]; other stages: hidden [B, S, H]. Returns hidden, or on the last stage a
        LastStageOutput for the loss function."""
        h = self.embed_tokens(x) if self.first else x
        cos, sin = self.rope(h.shape[1], h.device)
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        return LastStageOutput(h, self) if self.last else h

    def losses(self, h: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor, mtp_lambda: float):
        """The tail of DeepSeekV3.forward, op for op: (lm_loss, mtp_loss or None)."""
        cos, sin = self.rope(tokens.shape[1], h.device)
        h = self.norm(h)
        lm_loss = cross_entropy(self.lm_head(h), labels)
        return lm_loss, multi_token_loss(self, h, tokens, labels, cos, sin, mtp_lambda)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))


def split_stages(model: DeepSeekV3, num_stages: int, stages: list[int]) -> dict[int, PipelineStage]:
    """Independent copies of the wanted stages (DualPipe holds a stage twice: call once per copy).
    When both the first and the last stage are wanted, the last one's embedding IS the first one's."""
    built = {s: PipelineStage(model, s, num_stages) for s in stages}
    if 0 in built and num_stages - 1 in built and num_stages > 1 and hasattr(built[num_stages - 1], "embed_tokens"):
        share_embedding(built[0], built[num_stages - 1])
    return built


def share_embedding(first: PipelineStage, last: PipelineStage) -> None:
    """The MTP modules of `last` use `first`'s embedding Parameter itself (arXiv 2412.19437 §3.2)."""
    if hasattr(last, "embed_tokens"):
        last.embed_tokens = first.embed_tokens


def apply_selective_recompute(module: nn.Module) -> int:
    """arXiv 2412.19437 §3.2's selective recompute, applied from outside: every RMSNorm, and each MLA from its latents to
    the attention output (MLA.latent_attention: the latents' norms, the up-projections, RoPE and the
    attention core, as Megatron's selective recompute does for the core), run under non-reentrant activation
    checkpointing, so backward recomputes them from their inputs instead of keeping the norms' FP32
    intermediates, the normed latents, the up-projections' outputs and the per-head q, k, v. Parameter names
    do not change. Returns the number of regions wrapped."""
    from torch.utils.checkpoint import checkpoint

    from moetron.model.attention import MLA
    from moetron.model.norm import RMSNorm

    def recomputed(fn):
        def forward(*args):
            if not (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
                return fn(*args)
            return checkpoint(fn, *args, use_reentrant=False)
        return forward

    inside = set()  # norms inside a recomputed attention
    count = 0
    for m in module.modules():
        if isinstance(m, MLA):
            m.latent_attention = recomputed(m.latent_attention)
            inside.update(id(n) for n in (m.kv_a_layernorm, getattr(m, "q_a_layernorm", None)) if n is not None)
            count += 1
    for m in module.modules():
        if isinstance(m, RMSNorm) and id(m) not in inside:
            m.forward = recomputed(m.forward)
            count += 1
    return count
