"""Training FLOPs per token from the config (for MFU): 6 x the matrix parameters a token touches, plus the
attention core (QK^T and AV over the causal half of the sequence), forward + backward."""

from moetron.config import ModelConfig
from moetron.model.param_count import block_params, count_parameters


def attention_core_flops(cfg: ModelConfig, seq_len: int) -> float:
    per_layer = 2 * cfg.num_attention_heads * (seq_len / 2) * (cfg.qk_head_dim + cfg.v_head_dim)
    return 3 * per_layer  # forward + backward (2x)


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    counts = count_parameters(cfg)
    matrix_params = counts.activated - counts.embedding  # a lookup, not a matmul
    layers = cfg.num_hidden_layers
    flops = 6 * matrix_params + layers * attention_core_flops(cfg, seq_len)
    if cfg.num_nextn_predict_layers:
        _, mtp_block = block_params(cfg, moe=cfg.first_k_dense_replace < cfg.num_hidden_layers)
        per_module = mtp_block + 2 * cfg.hidden_size**2 + counts.head  # TRM_k, M_k and the shared head
        flops += cfg.num_nextn_predict_layers * (6 * per_module + attention_core_flops(cfg, seq_len))
    return flops


def achieved_tflops_per_device(tokens_per_s: float, flops_per_token: float, world_size: int) -> float:
    """Model TFLOP/s each device delivers: the step's model FLOPs are split over the world (pipeline stages,
    data-parallel replicas, experts and tensor shards each do their part), so one device does 1 / world."""
    return tokens_per_s * flops_per_token / world_size / 1e12


def mfu_per_device(tokens_per_s: float, flops_per_token: float, world_size: int, peak_tflops: float) -> float:
    """Model FLOPs utilization: one device's share of the model FLOP/s over one device's peak.
    `tokens_per_s` is the global throughput (all replicas together)."""
    return achieved_tflops_per_device(tokens_per_s, flops_per_token, world_size) / peak_tflops
