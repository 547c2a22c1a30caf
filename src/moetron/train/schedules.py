"""The schedules of arXiv 2412.19437 §4.2 as pure functions of the step and of the tokens consumed so far."""

import math

from moetron.config import OptimConfig, TrainConfig


def learning_rate(opt: OptimConfig, step: int, tokens: float) -> float:
    """Linear warm-up over steps; constant; cosine to min_lr over decay_tokens; min_lr; then final_lr."""
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    if tokens >= opt.final_lr_start_tokens:
        return opt.final_lr
    if tokens < opt.decay_start_tokens:
        return opt.lr
    progress = min((tokens - opt.decay_start_tokens) / max(opt.decay_tokens, 1.0), 1.0)
    return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1 + math.cos(math.pi * progress))


def batch_size(train: TrainConfig, tokens: float) -> int:
    """Sequences per step: grows linearly from batch_ramp_start to global_batch_size over batch_ramp_tokens,
    always a multiple of the micro-batch size."""
    ramp = min(tokens / train.batch_ramp_tokens, 1.0) if train.batch_ramp_tokens > 0 else 1.0
    size = train.batch_ramp_start + ramp * (train.global_batch_size - train.batch_ramp_start)
    size = int(size) // train.micro_batch_size * train.micro_batch_size
    return max(size, train.micro_batch_size)


def mtp_lambda(train: TrainConfig, tokens: float) -> float:
    return train.mtp_lambda if tokens < train.mtp_lambda_switch_tokens else train.mtp_lambda_final


def bias_update_rate(train: TrainConfig, tokens: float) -> float:
    return train.bias_update_rate if tokens < train.bias_update_stop_tokens else 0.0
