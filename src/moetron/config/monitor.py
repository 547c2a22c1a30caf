"""Typed configuration of monitoring: wandb, loss-spike detection and recovery, fault injection for drills."""

from dataclasses import dataclass, field

from moetron.config.checks import require_finite
from moetron.config.errors import invalid

SPIKE_POLICIES = ("warn", "skip", "rollback")
FAULT_KINDS = ("nan_loss", "scale_loss", "corrupt_batch", "crash", "crash_in_checkpoint")


@dataclass
class SpikeConfig:
    """A step is a spike when its loss (or grad norm) exceeds the linear trend of the last `window` accepted
    steps (extrapolated to it) + sigmas * their std around that trend. NaN/Inf always skips the update;
    spikes follow `policy`."""

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
    require_finite(monitor, prefix)
    if monitor.wandb_mode not in ("offline", "online", "disabled"):
        raise invalid(f"{prefix}.wandb_mode", monitor.wandb_mode, "'offline', 'online' or 'disabled'")
    if not monitor.expert_load_every > 0:
        raise invalid(f"{prefix}.expert_load_every", monitor.expert_load_every, "a positive integer")
    if not monitor.peak_tflops >= 0:
        raise invalid(f"{prefix}.peak_tflops", monitor.peak_tflops, "a number >= 0 (0: MFU not reported)")
    spike = monitor.spike
    for name in ("policy", "grad_policy"):
        if getattr(spike, name) not in SPIKE_POLICIES:
            raise invalid(f"{prefix}.spike.{name}", getattr(spike, name), " | ".join(SPIKE_POLICIES))
    if not spike.window >= 2:
        raise invalid(f"{prefix}.spike.window", spike.window, "an integer >= 2")
    if not 2 <= spike.min_history <= spike.window:
        raise invalid(f"{prefix}.spike.min_history", spike.min_history, f"2..spike.window ({spike.window})")
    if not spike.sigmas > 0:
        raise invalid(f"{prefix}.spike.sigmas", spike.sigmas, "a number > 0")
    if not spike.min_ratio >= 1:
        raise invalid(f"{prefix}.spike.min_ratio", spike.min_ratio, "a number >= 1")
    for name in ("rollback_skip_batches", "max_rollbacks"):
        if not getattr(spike, name) >= 0:
            raise invalid(f"{prefix}.spike.{name}", getattr(spike, name), "an integer >= 0")
    for i, fault in enumerate(monitor.faults):
        if fault.kind not in FAULT_KINDS:
            raise invalid(f"{prefix}.faults[{i}].kind", fault.kind, " | ".join(FAULT_KINDS))
        if not fault.step > 0:
            raise invalid(f"{prefix}.faults[{i}].step", fault.step, "a step number >= 1")
