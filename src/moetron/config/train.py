"""Typed configuration of the trainer, the data and the run (arXiv 2412.19437 §4.2 defaults)."""

from dataclasses import dataclass, field

from moetron.config.checks import require_finite
from moetron.config.data import BlendSource, DataConfig, SpecialTokens, validate_data
from moetron.config.errors import invalid

__all__ = ["BlendSource", "DataConfig", "OptimConfig", "RunConfig", "SpecialTokens", "TrainConfig",
           "validate_data", "validate_run", "validate_train"]


@dataclass
class OptimConfig:
    """AdamW with FP32 master weights and low-precision moments; the LR schedule of arXiv 2412.19437 §4.2."""

    lr: float = 2.2e-4
    min_lr: float = 2.2e-5  # reached at the end of the cosine decay, then held
    final_lr: float = 7.3e-6  # the last stage of the run
    warmup_steps: int = 2000
    decay_start_tokens: float = 10e12  # constant LR until here
    decay_tokens: float = 4.3e12  # cosine from lr to min_lr over this many tokens
    final_lr_start_tokens: float = 14.633e12  # min_lr for 333B tokens after the decay, then final_lr
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global norm; 0 disables clipping
    moment_dtype: str = "bfloat16"  # bfloat16 | float32


@dataclass
class TrainConfig:
    steps: int = 100
    seq_len: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 15360  # sequences per optimizer step at the end of the ramp
    batch_ramp_start: int = 3072  # sequences per step at the start of the ramp
    batch_ramp_tokens: float = 469e9  # tokens over which the batch grows to global_batch_size
    mtp_lambda: float = 0.3
    mtp_lambda_final: float = 0.1
    mtp_lambda_switch_tokens: float = 10e12
    bias_update_rate: float = 0.001  # gamma of the aux-loss-free balancing
    bias_update_stop_tokens: float = 14.3e12  # gamma is 0 afterwards
    precision: str = "fp32"  # compute dtype: fp32 | bf16 (autocast)
    # dtype of the model's parameters: fp32 (they are the masters, exact CPU equivalence) | bf16 (arXiv
    # 2412.19437 §3.3: FP32 masters and gradient accumulation live in the optimizer's ZeRO-1 shard)
    param_dtype: str = "fp32"
    eval_every: int = 50  # steps; 0 disables validation
    eval_batches: int = 4  # micro-batches of the held-out split per validation
    # Stop the run (exit 1) after this many consecutive steps whose loss or grad norm was NaN/Inf (each one's
    # update skipped): the last finite checkpoints are kept, and training on would only repeat the failure.
    max_nonfinite_steps: int = 10
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # steps; 0 means every quarter of the run
    keep_checkpoints: int = 3
    # Write checkpoints in the background (torch.distributed.checkpoint.async_save): the step stalls only for
    # a host copy of the state; the checkpoint is published (manifest, atomic rename) once the write is done.
    async_checkpoint: bool = False
    progress: bool = True  # a progress bar with loss, tok/s and ETA
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    device: str = "auto"  # auto (cuda:LOCAL_RANK with NCCL where CUDA is available, else cpu with gloo) | cpu | cuda
    # Build rank run.rank of the layout alone (torch's fake process group), print its parameter, gradient and
    # optimizer bytes beside moetron.plan's, and exit: no data, no training.
    dry_run: bool = False
    rank: int = 0


def validate_train(train: TrainConfig, prefix: str = "train") -> None:
    require_finite(train, prefix)
    for name in ["steps", "seq_len", "micro_batch_size", "global_batch_size", "batch_ramp_start", "max_nonfinite_steps"]:
        if not getattr(train, name) > 0:
            raise invalid(f"{prefix}.{name}", getattr(train, name), "a positive integer")
    if train.global_batch_size % train.micro_batch_size:
        raise invalid(f"{prefix}.global_batch_size", train.global_batch_size,
                      f"a multiple of train.micro_batch_size ({train.micro_batch_size})")
    if train.batch_ramp_start > train.global_batch_size:
        raise invalid(f"{prefix}.batch_ramp_start", train.batch_ramp_start,
                      f"at most train.global_batch_size ({train.global_batch_size})")
    if train.batch_ramp_start < train.micro_batch_size:
        raise invalid(f"{prefix}.batch_ramp_start", train.batch_ramp_start,
                      f"at least train.micro_batch_size ({train.micro_batch_size})")
    if train.precision not in ("fp32", "bf16"):
        raise invalid(f"{prefix}.precision", train.precision, "'fp32' or 'bf16'")
    if train.param_dtype not in ("fp32", "bf16"):
        raise invalid(f"{prefix}.param_dtype", train.param_dtype, "'fp32' or 'bf16'")
    if not train.eval_every >= 0:
        raise invalid(f"{prefix}.eval_every", train.eval_every, "an integer >= 0 (0 disables validation)")
    if not train.eval_batches >= (1 if train.eval_every > 0 else 0):
        raise invalid(f"{prefix}.eval_batches", train.eval_batches,
                      "a positive integer (or 0 with train.eval_every=0, validation off)")
    for name in ["mtp_lambda", "mtp_lambda_final", "bias_update_rate", "batch_ramp_tokens",
                 "mtp_lambda_switch_tokens", "bias_update_stop_tokens"]:
        if not getattr(train, name) >= 0:
            raise invalid(f"{prefix}.{name}", getattr(train, name), "a number >= 0")
    validate_optim(train.optim, f"{prefix}.optim")


def validate_optim(opt: OptimConfig, prefix: str = "train.optim") -> None:
    require_finite(opt, prefix)
    for name in ("lr", "eps"):
        if not getattr(opt, name) > 0:
            raise invalid(f"{prefix}.{name}", getattr(opt, name), "a number > 0")
    for name in ("min_lr", "final_lr", "weight_decay", "grad_clip", "decay_start_tokens", "final_lr_start_tokens"):
        if not getattr(opt, name) >= 0:
            raise invalid(f"{prefix}.{name}", getattr(opt, name), "a number >= 0" + (
                " (0 disables clipping)" if name == "grad_clip" else ""))
    if not opt.decay_tokens > 0:
        raise invalid(f"{prefix}.decay_tokens", opt.decay_tokens, "a number of tokens > 0")
    if not opt.warmup_steps >= 0:
        raise invalid(f"{prefix}.warmup_steps", opt.warmup_steps, "an integer >= 0")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(opt, name) < 1:
            raise invalid(f"{prefix}.{name}", getattr(opt, name), "a number in [0, 1)")
    if opt.moment_dtype not in ("bfloat16", "float32"):
        raise invalid(f"{prefix}.moment_dtype", opt.moment_dtype, "'bfloat16' or 'float32'")


def validate_run(run: RunConfig, prefix: str = "run") -> None:
    if not run.dir:
        raise invalid(f"{prefix}.dir", run.dir, "a directory path")
    for name in ["log_every", "keep_checkpoints"]:
        if not getattr(run, name) > 0:
            raise invalid(f"{prefix}.{name}", getattr(run, name), "a positive integer")
    if run.rank < 0:
        raise invalid(f"{prefix}.rank", run.rank, "a rank of the layout, 0 <= run.rank < parallel.pp x parallel.dp")
    if not run.save_every >= 0:
        raise invalid(f"{prefix}.save_every", run.save_every, "an integer >= 0 (0: every quarter of the run)")
    if not run.threads >= 0:
        raise invalid(f"{prefix}.threads", run.threads, "an integer >= 0 (0 keeps torch's default)")
    from moetron.device import DEVICES

    if run.device not in DEVICES:
        raise invalid(f"{prefix}.device", run.device, " | ".join(DEVICES))
