"""What one pipeline stage holds: layers, embedding, head, MTP; and per-token counts of one layer
(parameters split by where they live, forward FLOPs split by GEMM kind and precision)."""

from __future__ import annotations

from dataclasses import dataclass, field

from moetron.config import ModelConfig
from moetron.model.param_count import attention_params, swiglu_params


@dataclass
class Stage:
    index: int
    dense_layers: int = 0
    moe_layers: int = 0
    mtp_modules: int = 0
    embedding: bool = False
    head: bool = False
    mtp_embedding: bool = False  # the last stage's copy of the embedding for the MTP modules (stage 0 is elsewhere)

    @property
    def layers(self) -> int:
        return self.dense_layers + self.moe_layers + self.mtp_modules


def split_stages(model: ModelConfig, num_stages: int) -> list[Stage]:
    """The trainer's split (moetron.model.stages.layer_ranges): contiguous, near-equal runs counting the MTP
    modules as layers of the last stage, the first and last stages shorter (they also hold the embedding and
    the head); the last stage holds the final norm, the head and, for MTP, a copy of the embedding (one
    Parameter with stage 0's where a rank holds both)."""
    from moetron.model.stages import layer_ranges

    stages = []
    last = num_stages - 1
    for s, layers in enumerate(layer_ranges(model.num_hidden_layers, num_stages, model.num_nextn_predict_layers)):
        dense = sum(1 for i in layers if i < model.first_k_dense_replace)
        mtp = model.num_nextn_predict_layers if s == last else 0
        stages.append(Stage(s, dense, len(layers) - dense, mtp, embedding=s == 0, head=s == last,
                            mtp_embedding=s == last and mtp > 0 and num_stages > 1))
    return stages


@dataclass
class LayerCounts:
    """Per layer: parameters (replicated over DP / sharded over EP) and forward FLOPs per token."""

    params_dense: float = 0.0  # replicated on every DP rank (divided by TP)
    params_expert: float = 0.0  # routed experts held by ONE expert-parallel rank
    flops: dict[str, float] = field(default_factory=dict)  # kind -> forward FLOPs per token
    up_proj_flops: float = 0.0  # MLA up-projections (recomputed by `selective`)
    ops: int = 0  # aten calls in forward (for the per-op overhead on CPU; backward launches about as many again
    # for B and for W). Scale calibrated with torch.profiler on model=tiny: ~8,600 aten calls per
    # forward + backward of one micro-batch (1 dense layer, 3 MoE layers with 8 experts, 1 MTP module).


def attention_counts(m: ModelConfig, seq_len: int, tp: int) -> LayerCounts:
    h, heads = m.hidden_size, m.num_attention_heads
    q_up = m.q_lora_rank * heads * m.qk_head_dim if m.q_lora_rank else 0
    kv_up = m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
    proj = attention_params(m) - m.kv_lora_rank - m.q_lora_rank  # matrices only (norm vectors out)
    core = 2 * heads * (seq_len / 2) * (m.qk_head_dim + m.v_head_dim)  # QK^T and AV, causal half
    return LayerCounts(
        params_dense=(attention_params(m) + 2 * h) / tp,
        flops={"linear": 2 * proj / tp, "attn_core": core / tp},
        up_proj_flops=2 * (q_up + kv_up) / tp,
        ops=200,
    )


def ffn_counts(m: ModelConfig, moe: bool, ep: int, tp: int) -> LayerCounts:
    h = m.hidden_size
    if not moe:
        p = swiglu_params(h, m.intermediate_size) / tp
        return LayerCounts(params_dense=p, flops={"linear": 2 * p}, ops=50)
    expert = swiglu_params(h, m.moe_intermediate_size)
    local = m.n_routed_experts // ep
    shared = m.n_shared_experts * expert / tp
    return LayerCounts(
        params_dense=shared + m.n_routed_experts * h,
        params_expert=local * expert,
        flops={"linear": 2 * shared, "expert": 2 * m.num_experts_per_tok * expert,
               "router": 2 * m.n_routed_experts * h},
        ops=150 + 30 * local,
    )


def add(a: LayerCounts, b: LayerCounts, times: float = 1.0) -> LayerCounts:
    flops = dict(a.flops)
    for k, v in b.flops.items():
        flops[k] = flops.get(k, 0.0) + times * v
    return LayerCounts(a.params_dense + times * b.params_dense, a.params_expert + times * b.params_expert,
                       flops, a.up_proj_flops + times * b.up_proj_flops, a.ops + int(times * b.ops))


def stage_counts(m: ModelConfig, stage: Stage, seq_len: int, ep: int, tp: int) -> LayerCounts:
    """Parameters one rank holds for `stage` and the forward FLOPs per token through it."""
    attn = attention_counts(m, seq_len, tp)
    total = LayerCounts()
    total = add(total, add(attn, ffn_counts(m, False, ep, tp)), stage.dense_layers)
    moe_layer = add(attn, ffn_counts(m, m.first_k_dense_replace < m.num_hidden_layers, ep, tp))
    total = add(total, moe_layer, stage.moe_layers)
    h, vocab = m.hidden_size, m.vocab_size
    if stage.mtp_modules:
        proj = LayerCounts(params_dense=2 * h * h + 3 * h, flops={"linear": 4 * h * h, "head": 2 * vocab * h}, ops=40)
        total = add(total, add(moe_layer, proj), stage.mtp_modules)
    if stage.embedding or stage.mtp_embedding:
        total = add(total, LayerCounts(params_dense=vocab * h, ops=5 if stage.embedding else 0))
    if stage.head:
        total = add(total, LayerCounts(params_dense=vocab * h + h, flops={"head": 2 * vocab * h}, ops=30))
    return total
