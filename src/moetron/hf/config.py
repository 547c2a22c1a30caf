"""ModelConfig <-> the `config.json` of a Hugging Face DeepSeek-V3 directory.

The written config.json follows the published DeepSeek-V3 one (`rope_theta` + `rope_scaling`, `torch_dtype`,
`scoring_func`, `topk_method`, ...), which both transformers 4.x and 5.x read. On import, either that layout
or the one transformers 5 writes (`rope_parameters`, `dtype`) is accepted.
"""

from __future__ import annotations

import torch

from moetron.config import ConfigError, ModelConfig, RopeScaling

ARCHITECTURE = "DeepseekV3ForCausalLM"
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}

# Values the HF model (and the published checkpoint) can take where moetron supports exactly one of them.
_FIXED = {
    "model_type": ("deepseek_v3", "`deepseek_v3` (DeepSeek-V2 and others route with softmax and no bias)"),
    "hidden_act": ("silu", "`silu` (every expert is a SwiGLU MLP)"),
    "scoring_func": ("sigmoid", "`sigmoid` (DeepSeek-V3 affinities)"),
    "topk_method": ("noaux_tc", "`noaux_tc` (group-limited top-K with the balancing bias)"),
    "moe_layer_freq": (1, "1 (every layer after `first_k_dense_replace` is MoE)"),
    "attention_bias": (False, "false (MLA projections have no bias)"),
    "rope_interleave": (True, "true (RoPE rotates adjacent pairs, the published layout)"),
}


def routing_mismatch(cfg: ModelConfig) -> str | None:
    """Why the HF model routes differently from ours, or None when they agree.

    transformers (and DeepSeek's reference code) score a group by the sum of its top-2 biased affinities;
    moetron sums the top K/M (arXiv 2412.19437 §2.1.2). They agree when there is one group or K/M == 2."""
    if cfg.n_group > 1 and cfg.num_experts_per_tok // cfg.topk_group != 2:
        return (
            f"With n_group={cfg.n_group}, num_experts_per_tok={cfg.num_experts_per_tok} and "
            f"topk_group={cfg.topk_group}, moetron scores each expert group by the sum of its top "
            f"{cfg.num_experts_per_tok // cfg.topk_group} biased affinities, while transformers' DeepseekV3 "
            "(and DeepSeek's reference code) sums the top 2, so the two models would route tokens differently."
        )
    return None


def _yarn_scales_expressible(rs: RopeScaling) -> bool:
    """transformers uses mscale/mscale_all_dim only when both are set; else the cos/sin factor is
    0.1 ln(factor) + 1 and the softmax scale is unchanged. moetron can express exactly those two cases."""
    return bool(rs.mscale and rs.mscale_all_dim) or (rs.mscale == 1 and not rs.mscale_all_dim)


def hf_config(cfg: ModelConfig, dtype: torch.dtype, eos_token_id: int | None = None) -> dict:
    """A DeepseekV3Config-compatible dict (the published config.json's keys) for `cfg`.

    pad_token_id stays null: transformers would make it the embedding's padding_idx (a frozen row)."""
    if eos_token_id is not None and not 0 <= eos_token_id < cfg.vocab_size:
        eos_token_id = None
    rope_scaling = None
    if cfg.rope_scaling.type == "yarn":
        rs = cfg.rope_scaling
        if not _yarn_scales_expressible(rs):
            raise ConfigError(
                f"Invalid value for `model.rope_scaling.mscale`/`mscale_all_dim`: {rs.mscale!r}/{rs.mscale_all_dim!r}. "
                "transformers' YaRN applies these only when both are non-zero, so this model cannot be described "
                "by a DeepseekV3 config.json. Valid: both non-zero, or mscale 1.0 with mscale_all_dim 0."
            )
        rope_scaling = {
            "type": "yarn", "rope_type": "yarn", "factor": float(rs.factor),
            "original_max_position_embeddings": int(rs.original_max_position_embeddings),
            "beta_fast": float(rs.beta_fast), "beta_slow": float(rs.beta_slow),
            "mscale": float(rs.mscale), "mscale_all_dim": float(rs.mscale_all_dim),
        }
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "first_k_dense_replace": cfg.first_k_dense_replace,
        "moe_layer_freq": 1,
        "ep_size": 1,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,  # MLA: every head has its own key and value
        "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "routed_scaling_factor": float(cfg.routed_scaling_factor),
        "norm_topk_prob": bool(cfg.norm_topk_prob),
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "aux_loss_alpha": float(cfg.aux_loss_alpha),
        "seq_aux": True,
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": float(cfg.rope_theta),
        "rope_scaling": rope_scaling,
        "rope_interleave": True,
        "rms_norm_eps": float(cfg.rms_norm_eps),
        "initializer_range": float(cfg.initializer_range),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": DTYPE_NAMES[dtype],
    }


def _bad(where: str, key: str, value, valid: str, why: str = "") -> ConfigError:
    reason = f" {why}" if why else ""
    return ConfigError(f"Unsupported value in {where}: `{key}` = {value!r}.{reason} Valid: {valid}.")


def _rope_from_hf(hf: dict, where: str, max_pos: int) -> tuple[float, RopeScaling]:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise _bad(where, "rope_scaling", params, "null or an object with `type`/`rope_type`")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), RopeScaling(type="none")
    if rope_type != "yarn":
        raise _bad(where, "rope_scaling.rope_type", rope_type, "`default` (none) or `yarn`",
                   "moetron implements plain RoPE and YaRN (arXiv 2412.19437 §2.1.1).")
    if params.get("attention_factor") is not None:
        raise _bad(where, "rope_scaling.attention_factor", params["attention_factor"], "absent (null)",
                   "moetron derives the YaRN attention factor from factor/mscale/mscale_all_dim.")
    if params.get("truncate", True) is not True:
        raise _bad(where, "rope_scaling.truncate", params["truncate"], "true (absent)")
    original = params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor") or max_pos / original
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if not (mscale and mscale_all_dim):
        if mscale_all_dim:  # transformers would scale the softmax but not cos/sin by mscale_all_dim
            raise _bad(where, "rope_scaling.mscale", mscale, "a non-zero number when mscale_all_dim is set")
        mscale, mscale_all_dim = 1.0, 0.0  # transformers' behaviour when either is unset
    scaling = RopeScaling(
        type="yarn", factor=float(factor), original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(mscale), mscale_all_dim=float(mscale_all_dim),
    )
    return float(theta), scaling


def model_config(hf: dict, where: str, name: str = "imported", aux_loss_alpha: float | None = None) -> ModelConfig:
    """The ModelConfig of a DeepSeek-V3 config.json (`where` names the file in error messages)."""
    for key, (value, valid) in _FIXED.items():
        if key in hf and hf[key] is not None and hf[key] != value:
            raise _bad(where, key, hf[key], valid)
    if "model_type" not in hf:
        raise _bad(where, "model_type", None, _FIXED["model_type"][1])
    required = [
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
        "n_routed_experts", "num_experts_per_tok",
    ]
    for key in required:
        if not isinstance(hf.get(key), int) or isinstance(hf.get(key), bool):
            raise _bad(where, key, hf.get(key), "a positive integer", "moetron needs it to build the model.")
    heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads") not in (None, heads):
        raise _bad(where, "num_key_value_heads", hf["num_key_value_heads"], f"num_attention_heads ({heads})",
                   "MLA gives every head its own key and value.")
    quant = hf.get("quantization_config")
    if quant is not None and (not isinstance(quant, dict) or quant.get("quant_method") != "fp8"):
        raise _bad(where, "quantization_config", quant, "absent, or block-scaled fp8 as in the published weights")
    max_pos = int(hf.get("max_position_embeddings", 4096))
    theta, scaling = _rope_from_hf(hf, where, max_pos)
    def get(key, default):  # an absent key means transformers' DeepseekV3Config default; null means "none"
        value = hf.get(key, default)
        return 0 if value is None else value

    q_lora_rank = get("q_lora_rank", 1536)
    mtp = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 1)) or 0
    defaults = ModelConfig()
    cfg = ModelConfig(
        name=name,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        first_k_dense_replace=get("first_k_dense_replace", 3),
        num_attention_heads=heads,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        n_routed_experts=hf["n_routed_experts"],
        n_shared_experts=get("n_shared_experts", 1),
        moe_intermediate_size=hf["moe_intermediate_size"],
        num_experts_per_tok=hf["num_experts_per_tok"],
        n_group=get("n_group", 8) or 1,
        topk_group=get("topk_group", 4) or 1,
        routed_scaling_factor=float(get("routed_scaling_factor", 2.5)),
        norm_topk_prob=bool(get("norm_topk_prob", True)),
        aux_loss_alpha=float(aux_loss_alpha if aux_loss_alpha is not None
                             else hf.get("aux_loss_alpha", defaults.aux_loss_alpha)),
        num_nextn_predict_layers=int(mtp),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        initializer_range=float(hf.get("initializer_range", defaults.initializer_range)),
    )
    try:
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{where} describes a model moetron cannot build: {err}") from err
    return cfg
