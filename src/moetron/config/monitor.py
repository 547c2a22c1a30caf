"""Typed configuration of monitoring: wandb, loss-spike detection and recovery, fault injection for drills."""

from dataclasses import dataclass, field

from moetron.config.errors import invalid

SPIKE_POLICIES = ("warn", "skip", "rollback")
FAULT_KINDS = ("nan_loss", "scale_loss", "corrupt_batch", "crash", "crash_in_checkpoint")


@dataclass
class SpikeConfig:
    """A step is a spike when its loss (or grad norm) exceeds mean + sigmas * std of the last `window`
    accepted steps. NaN/Inf always skips the update; spikes follow `policy`."""

    policy: str = "rollback"  # for loss spikes: warn | skip (drop that update) | rollback (PaLM-style)
    # For grad-norm spikes alone (the loss still normal). Clipping already bounds such an update, and small
    # models show isolated 3-7x grad-norm jumps, so by default they are recorded and alerted, not acted on.
    grad_policy: str = "warn"
    window: int = 50
    min_history: int = 20  # steps of history before spikes are judged
    sigmas: float = 6.0
    min_ratio: float = 1.05  # ...and at least this multiple of the mean (ignores noise on flat curves)
    check_grad_norm: bool = True  # grad-norm spikes often precede loss spikes
    rollback_skip_batches: int = 200  # batches skipped past the spike after a rollback (PaLM: 200-500)
    max_rollbacks: int = 5  # beyond this, spikes are skipped instead (a run must not loop forever)


@dataclass
class FaultConfig:
    """A fault injected at `step` (once per process), for tests and drills."""

    step: int = 0
    kind: str = "nan_loss"  # nan_loss | scale_loss | corrupt_batch | crash | crash_in_checkpoint
    value: float = 100.0  # the factor of scale_loss


@dataclass
class MonitorConfig:
    wandb: bool = True
    wandb_mode: str = "offline"  # offline (no account needed) | online | disabled
    wandb_project: str = "moetron"
    wandb_entity: str | None = None
    peak_tflops: float = 0.0  # the device's dense peak for MFU; 0: MFU not reported
    expert_load_every: int = 10  # steps between expert-load records (expert_load.jsonl, wandb heatmap)
    report: bool = True  # write report.png at the end of the run
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    faults: list[FaultConfig] = field(default_factory=list)


def validate_monitor(monitor: MonitorConfig, prefix: str = "monitor") -> None:
    if monitor.wandb_mode not in ("offline", "online", "disabled"):
        raise invalid(f"{prefix}.wandb_mode", monitor.wandb_mode, "'offline', 'online' or 'disabled'")
    if monitor.expert_load_every <= 0:
        raise invalid(f"{prefix}.expert_load_every", monitor.expert_load_every, "a positive integer")
    spike = monitor.spike
    for name in ("policy", "grad_policy"):
        if getattr(spike, name) not in SPIKE_POLICIES:
            raise invalid(f"{prefix}.spike.{name}", getattr(spike, name), " | ".join(SPIKE_POLICIES))
    if spike.window < 2 or spike.min_history < 2 or spike.min_history > spike.window:
        raise invalid(f"{prefix}.spike.min_history", spike.min_history,
                      f"2..spike.window ({spike.window}), with window >= 2")
    if spike.sigmas <= 0 or spike.min_ratio < 1:
        raise invalid(f"{prefix}.spike.sigmas", spike.sigmas, "sigmas > 0 and min_ratio >= 1")
    if spike.rollback_skip_batches < 0 or spike.max_rollbacks < 0:
        raise invalid(f"{prefix}.spike.rollback_skip_batches", spike.rollback_skip_batches, "an integer >= 0")
    for i, fault in enumerate(monitor.faults):
        if fault.kind not in FAULT_KINDS:
            raise invalid(f"{prefix}.faults[{i}].kind", fault.kind, " | ".join(FAULT_KINDS))
        if fault.step <= 0:
            raise invalid(f"{prefix}.faults[{i}].step", fault.step, "a step number >= 1")
