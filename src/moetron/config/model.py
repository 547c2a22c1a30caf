"""Typed model configuration (field names follow Hugging Face's DeepseekV3Config where one exists)."""

from dataclasses import dataclass, field

from moetron.config.checks import require_finite
from moetron.config.errors import invalid


@dataclass
class RopeScaling:
    """YaRN context extension (arXiv 2412.19437 §2.1.1). type "none" means plain RoPE."""

    type: str = "none"  # none | yarn
    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 384  # dense FFN of the first `first_k_dense_replace` layers
    num_hidden_layers: int = 4
    first_k_dense_replace: int = 1
    num_attention_heads: int = 4
    # MLA (arXiv 2412.19437 §2.1.1). q_lora_rank = 0 means no query compression (q = W_Q h).
    q_lora_rank: int = 64
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    # DeepSeekMoE (arXiv 2412.19437 §2.1.2)
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    moe_intermediate_size: int = 64
    num_experts_per_tok: int = 4  # K_r
    n_group: int = 2  # G: expert groups = nodes of the EP layout
    topk_group: int = 1  # M: groups kept per token
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    aux_loss_alpha: float = 0.0001  # sequence-wise balance loss weight
    # Multi-token prediction (arXiv 2412.19437 §2.2)
    num_nextn_predict_layers: int = 1  # D; 0 turns MTP off
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self, prefix: str = "model") -> None:
        require_finite(self, prefix)
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
            "moe_intermediate_size", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings",
        ]
        for name in positive:
            value = getattr(self, name)
            if not value > 0:
                raise invalid(f"{prefix}.{name}", value, "a positive integer")
        for name in ["q_lora_rank", "n_shared_experts", "num_nextn_predict_layers", "first_k_dense_replace"]:
            if not getattr(self, name) >= 0:
                raise invalid(f"{prefix}.{name}", getattr(self, name), "an integer >= 0")
        if self.qk_rope_head_dim % 2:
            raise invalid(f"{prefix}.qk_rope_head_dim", self.qk_rope_head_dim, "an even number",
                          "RoPE rotates pairs of dimensions.")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise invalid(f"{prefix}.first_k_dense_replace", self.first_k_dense_replace,
                          f"0..num_hidden_layers ({self.num_hidden_layers})")
        if self.n_routed_experts % self.n_group:
            raise invalid(f"{prefix}.n_group", self.n_group,
                          f"a divisor of model.n_routed_experts ({self.n_routed_experts})",
                          "Experts are split into equal groups, one group per node of the expert-parallel layout.")
        if self.topk_group > self.n_group:
            raise invalid(f"{prefix}.topk_group", self.topk_group,
                          f"1..model.n_group ({self.n_group})",
                          "It is the number of groups (nodes) a token may reach.")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise invalid(f"{prefix}.num_experts_per_tok", self.num_experts_per_tok,
                          f"1..model.n_routed_experts ({self.n_routed_experts})")
        if self.num_experts_per_tok % self.topk_group:
            raise invalid(f"{prefix}.num_experts_per_tok", self.num_experts_per_tok,
                          f"a multiple of model.topk_group ({self.topk_group})",
                          "A group's score is the sum of its top (K / M) scores, so K must divide by M.")
        experts_kept = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > experts_kept:
            raise invalid(f"{prefix}.num_experts_per_tok", self.num_experts_per_tok,
                          f"at most topk_group x experts per group = {experts_kept}",
                          "The kept groups must hold at least K experts.")
        if self.num_experts_per_tok // self.topk_group > self.n_routed_experts // self.n_group:
            raise invalid(f"{prefix}.topk_group", self.topk_group,
                          "a value with K / M <= experts per group")
        for name in ("routed_scaling_factor", "initializer_range", "rope_theta", "rms_norm_eps"):
            if not getattr(self, name) > 0:
                raise invalid(f"{prefix}.{name}", getattr(self, name), "a number > 0")
        if not self.aux_loss_alpha >= 0:
            raise invalid(f"{prefix}.aux_loss_alpha", self.aux_loss_alpha, "a number >= 0")
        rope = self.rope_scaling
        if rope.type not in ("none", "yarn"):
            raise invalid(f"{prefix}.rope_scaling.type", rope.type, "'none' or 'yarn'")
        if rope.type == "yarn":
            if not rope.factor >= 1:
                raise invalid(f"{prefix}.rope_scaling.factor", rope.factor, "a number >= 1")
            for name in ("original_max_position_embeddings", "beta_fast", "beta_slow"):
                if not getattr(rope, name) > 0:
                    raise invalid(f"{prefix}.rope_scaling.{name}", getattr(rope, name), "a number > 0")
            for name in ("mscale", "mscale_all_dim"):
                if not getattr(rope, name) >= 0:
                    raise invalid(f"{prefix}.rope_scaling.{name}", getattr(rope, name), "a number >= 0")
