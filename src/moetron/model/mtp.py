"""Multi-token prediction (arXiv 2412.19437 §2.2). Module k combines the previous depth's hidden state with the
embedding of token t_{i+k} and predicts t_{i+k+1}; the embedding and the output head are the main
model's (shared by reference, not copied). Depth 1 receives the main model's final-normed state, the
convention of the published checkpoint's users (transformers, vLLM, Megatron-core)."""

import torch
from torch import nn

from moetron.config import ModelConfig
from moetron.model.block import Block
from moetron.model.norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # on Emb(t_{i+k})
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # on h^{k-1}
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)  # M_k, d x 2d
        self.block = Block(cfg, moe=cfg.first_k_dense_replace < cfg.num_hidden_layers)  # TRM_k
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # before the shared head

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h'^k = M_k [RMSNorm(h^{k-1}); RMSNorm(Emb(t_{i+k}))];  h^k = TRM_k(h'^k)."""
        merged = self.eh_proj(torch.cat([self.hnorm(h_prev), self.enorm(emb_next)], dim=-1))
        return self.block(merged, cos, sin)


def shift_left(x: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """x[:, i] -> x[:, i + k]; the last k positions get `fill`."""
    if k == 0:
        return x
    return torch.cat([x[:, k:], x.new_full((x.shape[0], k), fill)], dim=1)
