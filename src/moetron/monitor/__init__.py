"""Monitoring and recovery: spike detection, fault injection, wandb logging, the offline-run reader."""

from moetron.monitor.faults import FaultInjector
from moetron.monitor.spikes import SpikeDetector, Verdict

__all__ = ["FaultInjector", "SpikeDetector", "Verdict"]
