"""One pre-norm Transformer block: h + MLA(norm(h)), then + FFN(norm(.)) where FFN is dense or DeepSeekMoE."""

import torch
from torch import nn

from moetron.config import ModelConfig
from moetron.model.attention import MLA
from moetron.model.mlp import SwiGLU
from moetron.model.moe import MoE
from moetron.model.norm import RMSNorm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))
