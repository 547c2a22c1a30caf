"""Multi-head Latent Attention (arXiv 2412.19437 §2.1.1): low-rank joint compression of keys/values (and queries),
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

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.latent_attention(*self.down_project(h), cos, sin))

    def latent_attention(self, c_q: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> torch.Tensor:
        """Latents -> attention output [batch, seq, heads x v dim] (the input of W_O). Selective recompute
        (arXiv 2412.19437 §3.2) recomputes all of it from the latents in backward, so neither the up-projections' outputs
        nor the per-head q, k, v that the attention core reads are kept."""
        return self.attend(*self.up_project(c_q, c_kv, k_rope, cos, sin))

    def down_project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The latents: c_q = W_DQ h (h itself without query compression), c_kv and the shared RoPE key."""
        c_q = self.q_a_proj(h) if self.compress_q else h
        c_kv, k_rope = self.kv_a_proj_with_mqa(h).split([self.kv_rank, self.rope_dim], dim=-1)
        return c_q, c_kv, k_rope

    def up_project(self, c_q: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents -> per-head q, k, v [batch, seq, heads, qk dim]: the latents' norms, the up-projections and
        RoPE. v is zero-padded to the q/k dim, because fused SDPA kernels want one head dim for q, k and v."""
        batch, seq, _ = c_kv.shape
        q = self.q_b_proj(self.q_a_layernorm(c_q)) if self.compress_q else self.q_proj(c_q)
        q_nope, q_rope = q.view(batch, seq, self.n_heads, self.nope_dim + self.rope_dim).split(
            [self.nope_dim, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(batch, seq, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)

        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope.view(batch, seq, 1, self.rope_dim), cos, sin)  # one key head for all
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, -1, self.n_heads, -1)], dim=-1)
        pad = q.shape[-1] - self.v_dim
        return q, k, F.pad(v, (0, pad)) if pad > 0 else v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention core softmax(QK^T)V, in high precision (arXiv 2412.19437 §3.3)."""
        batch, seq = q.shape[:2]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.softmax_scale
        )
        return out[..., : self.v_dim].transpose(1, 2).reshape(batch, seq, self.n_heads * self.v_dim)
