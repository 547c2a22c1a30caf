"""Checkpoints: torch.distributed.checkpoint (DCP) for model + optimizer, JSON for the trainer's counters,
published atomically (written under a temporary name, then renamed) so a crash never leaves a half one."""

from moetron.checkpoint.store import CheckpointStore, LoadedCheckpoint

__all__ = ["CheckpointStore", "LoadedCheckpoint"]
