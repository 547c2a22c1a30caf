"""Per-rank memory, item by item (bytes), for a pipeline rank holding some stages."""

from __future__ import annotations

from dataclasses import dataclass

from moetron.config import ModelConfig
from moetron.plan.stages import Stage

GB = 1e9


@dataclass
class Precision:
    act: int  # bytes of a high-precision cached activation (BF16 2, FP32 4)
    lin: int  # bytes of a cached Linear input (FP8 1 when FP8 caching is on, else act)
    fp8: bool

    @classmethod
    def of(cls, precision: str, fp8: bool) -> Precision:
        act = 4 if precision == "fp32" and not fp8 else 2
        return cls(act, 1 if fp8 else act, fp8)


def attention_act(m: ModelConfig, seq_len: int, tp: int, p: Precision, recompute: str, fused: bool) -> float:
    """Bytes cached per token by one attention sub-layer (with its pre-norm) for backward."""
    h, heads = m.hidden_size, m.num_attention_heads // tp
    x = p.act * h  # the sub-layer input (residual stream), always kept
    if recompute == "full":
        return x
    keep_norm = recompute == "none"
    x += p.lin * h if keep_norm else 0  # RMSNorm output = input of W_DQ / W_DKV
    if m.q_lora_rank:
        x += p.act * m.q_lora_rank + (p.lin * m.q_lora_rank if keep_norm else 0)  # c_q before / after its norm
    x += p.act * (m.kv_lora_rank + m.qk_rope_head_dim) + (p.lin * m.kv_lora_rank if keep_norm else 0)
    if keep_norm:  # q, k, v as the attention core reads them (recomputed from c_q, c_kv by `selective`)
        x += p.act * heads * (2 * m.qk_head_dim + m.v_head_dim)
    x += p.lin * heads * m.v_head_dim + 4 * heads  # core output (W_O input) and the softmax log-sum-exp
    if not fused:
        x += p.act * heads * seq_len  # the probabilities, when no fused attention kernel is available
    return x


def ffn_act(m: ModelConfig, moe: bool, tp: int, p: Precision, recompute: str) -> float:
    h = m.hidden_size
    x = p.act * h
    if recompute == "full":
        return x
    x += p.lin * h if recompute == "none" else 0  # norm output (input of router, shared expert, dispatch)
    swiglu_out = 0 if p.fp8 else 1  # FP8 recipe: SwiGLU inputs cached in FP8, its output recomputed
    if not moe:
        inter = m.intermediate_size / tp
        return x + p.lin * 2 * inter + swiglu_out * p.act * inter
    k, inter = m.num_experts_per_tok, m.moe_intermediate_size
    shared = m.n_shared_experts / tp
    x += 4 * m.n_routed_experts + 8 * k  # router scores (FP32) and the kept gates / ids
    x += (p.lin + (4 / 128 if p.fp8 else 0)) * k * h  # dispatched rows at the experts (with 1x128 scales)
    x += (k + shared) * (p.lin * 2 * inter + swiglu_out * p.act * inter)  # SwiGLU in (and out)
    return x


def stage_activation_per_token(m: ModelConfig, stage: Stage, seq_len: int, tp: int, p: Precision,
                               recompute: str, fused_attention: bool, fused_ce: bool) -> float:
    attn = attention_act(m, seq_len, tp, p, recompute, fused_attention)
    moe = m.first_k_dense_replace < m.num_hidden_layers
    total = stage.dense_layers * (attn + ffn_act(m, False, tp, p, recompute))
    total += stage.moe_layers * (attn + ffn_act(m, moe, tp, p, recompute))
    h, vocab = m.hidden_size, m.vocab_size
    heads_out = stage.head + stage.mtp_modules
    if stage.mtp_modules:
        mtp_in = p.act * 2 * h + (0 if recompute == "full" else p.lin * 2 * h)  # two norms, eh_proj input
        total += stage.mtp_modules * (attn + ffn_act(m, moe, tp, p, recompute) + mtp_in)
    total += heads_out * (p.act * h + (0 if fused_ce else 4 * vocab))  # head input (and FP32 logits)
    return total


def layer_activation_full(m: ModelConfig, seq_len: int, tp: int, p: Precision, fused_attention: bool) -> float:
    """One layer with nothing recomputed: the transient working set of a `full` recompute."""
    return attention_act(m, seq_len, tp, p, "none", fused_attention) + ffn_act(m, True, tp, p, "none")


def peak_weighted(steps, chunk_bytes) -> float:
    """Most bytes of cached activations alive at once on one rank, walking its schedule steps
    (a chunk lives from its F until its backward is complete, as in parallel.simulator)."""
    from moetron.parallel import Op, actions_of

    live: dict[tuple, float] = {}
    peak = current = 0.0
    for step in steps:
        for a in actions_of(step):
            chunk = (a.microbatch, a.stage, a.direction)
            if a.op == Op.F:
                live[chunk] = chunk_bytes(a.stage)
                current += live[chunk]
                peak = max(peak, current)
            elif a.op in (Op.BW, Op.W) and chunk in live:
                current -= live.pop(chunk)
    return peak
