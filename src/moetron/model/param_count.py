"""Parameter counts from the config alone (no allocation), as the DeepSeek-V3 report counts them."""

from dataclasses import dataclass

from moetron.config import ModelConfig


@dataclass
class ParamCount:
    total: int  # main model (embedding, blocks, final norm, head), without MTP
    activated: int  # what one token touches in the main model: shared parts + K routed experts per MoE layer
    mtp: int  # the MTP modules as the published checkpoint stores them (with copies of embedding and head)
    mtp_own: int  # the MTP modules' own weights (what training adds, embedding and head being shared)
    embedding: int
    head: int


def attention_params(cfg: ModelConfig) -> int:
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank > 0:
        q = h * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * heads * cfg.qk_head_dim
    else:
        q = h * heads * cfg.qk_head_dim
    kv = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    kv += cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + heads * cfg.v_head_dim * h


def swiglu_params(hidden: int, intermediate: int) -> int:
    return 3 * hidden * intermediate


def moe_params(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, parameters one token activates) of one MoE FFN."""
    expert = swiglu_params(cfg.hidden_size, cfg.moe_intermediate_size)
    router = cfg.n_routed_experts * cfg.hidden_size
    shared = cfg.n_shared_experts * expert
    return router + shared + cfg.n_routed_experts * expert, router + shared + cfg.num_experts_per_tok * expert


def block_params(cfg: ModelConfig, moe: bool) -> tuple[int, int]:
    common = attention_params(cfg) + 2 * cfg.hidden_size  # two RMSNorms
    if moe:
        total, active = moe_params(cfg)
        return common + total, common + active
    dense = swiglu_params(cfg.hidden_size, cfg.intermediate_size)
    return common + dense, common + dense


def count_parameters(cfg: ModelConfig) -> ParamCount:
    embedding = head = cfg.vocab_size * cfg.hidden_size
    dense_layers = cfg.first_k_dense_replace
    moe_layers = cfg.num_hidden_layers - dense_layers
    dense_total, _ = block_params(cfg, moe=False)
    moe_total, moe_active = block_params(cfg, moe=True)
    shared = embedding + head + cfg.hidden_size  # + final norm
    total = shared + dense_layers * dense_total + moe_layers * moe_total
    activated = shared + dense_layers * dense_total + moe_layers * moe_active
    mtp_block, _ = block_params(cfg, moe=moe_layers > 0)
    h = cfg.hidden_size
    mtp_own = cfg.num_nextn_predict_layers * (2 * h + 2 * h * h + mtp_block + h)  # enorm, hnorm, eh_proj, TRM, norm
    mtp = mtp_own + cfg.num_nextn_predict_layers * (embedding + head)
    return ParamCount(total, activated, mtp, mtp_own, embedding, head)
