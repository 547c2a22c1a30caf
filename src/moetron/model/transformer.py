"""The DeepSeek-V3 language model: embedding, MLA + (dense | MoE) blocks, final norm, output head,
and D multi-token-prediction modules that share the embedding and the head (arXiv 2412.19437 §2)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moetron.config import ModelConfig
from moetron.model.block import Block
from moetron.model.init import init_parameters
from moetron.model.moe import MoE
from moetron.model.mtp import MTPModule, shift_left
from moetron.model.norm import RMSNorm
from moetron.model.rope import rope_cos_sin

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # lm_loss + mtp_loss (the balance loss trains through its own hook)
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def multi_token_loss(owner: nn.Module, h: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, mtp_lambda: float) -> torch.Tensor | None:
    """(lambda / D) * sum_k CE(P^k, labels shifted by k), from the final-normed main state h. `owner` holds
    `mtp`, `embed_tokens` and `lm_head` (the whole model, or the pipeline stage with the model's tail)."""
    losses = []
    for k, module in enumerate(owner.mtp, start=1):
        h = module(h, owner.embed_tokens(shift_left(tokens, k, fill=0)), cos, sin)
        logits = owner.lm_head(module.norm(h))
        losses.append(cross_entropy(logits, shift_left(labels, k, fill=IGNORE_INDEX)))
    return mtp_lambda * torch.stack(losses).mean() if losses else None


class DeepSeekV3(nn.Module):
    """Built on the meta device (`with torch.device("meta")`) it allocates and initializes nothing: a trainer
    keeps its part, materializes it and calls model.init.init_parameters (the same values as here)."""

    def __init__(self, cfg: ModelConfig, seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        # init_weights sets every value; _weight skips nn.Embedding's own normal_ (on meta, a Python
        # decomposition whose first use imports ~30 MB and ~2 s of torch._refs on every rank)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(
            Block(cfg, moe=i >= cfg.first_k_dense_replace) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # untied from the embedding
        self.mtp = nn.ModuleList(MTPModule(cfg) for _ in range(cfg.num_nextn_predict_layers))
        if not self.embed_tokens.weight.is_meta:
            self.init_weights(torch.initial_seed() if seed is None else seed)

    def init_weights(self, seed: int) -> None:
        """Normal(0, 0.006) for every matrix (arXiv 2412.19437 §4.2), ones for norms, zero balancing bias;
        each tensor (each routed expert) from its own generator (model/init.py), so any layout's ranks
        draw these very values for their part. `seed` defaults to torch.manual_seed's."""
        init_parameters(self, seed, self.cfg.initializer_range)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def rope(self, seq_len: int, device: torch.device):
        positions = torch.arange(seq_len, device=device)
        return rope_cos_sin(positions, self.cfg.qk_rope_head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, mtp_lambda: float = 0.0):
        """tokens [B, S] -> logits [B, S, V]; with labels [B, S] (the tokens shifted by one), also the losses
        L = L_main + (lambda / D) * sum_k CE(P^k, labels shifted by k)."""
        cos, sin = self.rope(tokens.shape[1], tokens.device)
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin)
        h = self.norm(h)  # MTP depth 1 also starts from the final-normed state (as transformers/vLLM/Megatron)
        logits = self.lm_head(h)
        if labels is None:
            return ModelOutput(logits=logits)

        lm_loss = cross_entropy(logits, labels)
        mtp_loss = multi_token_loss(self, h, tokens, labels, cos, sin, mtp_lambda)
        loss = lm_loss + mtp_loss if mtp_loss is not None else lm_loss
        return ModelOutput(logits=logits, loss=loss, lm_loss=lm_loss, mtp_loss=mtp_loss)
