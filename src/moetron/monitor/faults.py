"""Fault injection for tests and drills. Each configured fault fires once per run at its step: fired faults
are recorded (events.jsonl), so a restarted or rolled-back run does not fire them again."""

import os
import signal

import torch

from moetron.config.monitor import FaultConfig


class FaultInjector:
    def __init__(self, faults: list[FaultConfig], fired: set[tuple[int, str]] = frozenset(), on_fire=None):
        self.pending = {(f.step, f.kind): f for f in faults if (f.step, f.kind) not in fired}
        self.on_fire = on_fire  # called with (step, kind) just before a fault takes effect

    def take(self, step: int, kind: str) -> FaultConfig | None:
        fault = self.pending.pop((step, kind), None)
        if fault is not None and self.on_fire is not None:
            self.on_fire(step, kind)
        return fault

    def batch(self, step: int, batch: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """corrupt_batch: replace the step's tokens by uniform noise (a real loss spike)."""
        if self.take(step, "corrupt_batch") is None:
            return batch
        generator = torch.Generator().manual_seed(step)
        return torch.randint(0, vocab_size, batch.shape, generator=generator)

    def loss_factor(self, step: int) -> float:
        """The factor every micro-batch loss of the step is multiplied by: NaN for nan_loss, the value for
        scale_loss (which scales the gradients too), else 1."""
        if self.take(step, "nan_loss") is not None:
            return float("nan")
        fault = self.take(step, "scale_loss")
        return fault.value if fault is not None else 1.0

    def crash(self, step: int) -> None:
        """crash: the process dies at once (SIGKILL), as a node failure would end it."""
        if self.take(step, "crash") is not None:
            os.kill(os.getpid(), signal.SIGKILL)

    def checkpoint_hook(self, step: int):
        """crash_in_checkpoint: a callback that kills the process after the shards are written but before
        the checkpoint is published."""
        if self.take(step, "crash_in_checkpoint") is None:
            return None
        return lambda: os.kill(os.getpid(), signal.SIGKILL)
