"""Multi-head Latent Attention (SPEC §1.2): low-rank joint compression of keys/values (and queries),
with a decoupled RoPE key shared by all heads."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from moetron.config import ModelConfig
from moetron.model.norm import RMSNorm
from moetron.model.rope import apply_rope, yarn_mscale


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        self.compress_q = cfg.q_lora_rank > 0
        if self.compress_q:  # query compression: c_q = RMSNorm(W_DQ h); q = W_UQ c_q
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * qk_dim, bias=False)
        else:  # lite layouts: q = W_Q h
            self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * qk_dim, bias=False)
        # [c_kv, k_rope] = W_DKV h; c_kv = RMSNorm(c_kv); [k_nope, v] = W_UKV c_kv
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.kv_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=False)
        self.softmax_scale = 1.0 / math.sqrt(qk_dim)
        if cfg.rope_scaling.type == "yarn":
            self.softmax_scale *= yarn_mscale(cfg.rope_scaling.factor, cfg.rope_scaling.mscale_all_dim) ** 2

    def query(self, h: torch.Tensor) -> torch.Tensor:
        if self.compress_q:
            return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(h)))
        return self.q_proj(h)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = h.shape
        q = self.query(h).view(batch, seq, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)

        c_kv, k_rope = self.kv_a_proj_with_mqa(h).split([self.kv_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(batch, seq, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)

        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope.view(batch, seq, 1, self.rope_dim), cos, sin)  # one key head for all
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, -1, self.n_heads, -1)], dim=-1)

        # The attention core softmax(QK^T)V stays in high precision (SPEC §4). Fused SDPA kernels want one
        # head dim for q, k and v: pad v with zeros to the q/k dim and drop the padding after.
        pad = q.shape[-1] - self.v_dim
        v = F.pad(v, (0, pad)) if pad > 0 else v
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.softmax_scale
        )
        out = out[..., : self.v_dim].transpose(1, 2).reshape(batch, seq, self.n_heads * self.v_dim)
        return self.o_proj(out)
