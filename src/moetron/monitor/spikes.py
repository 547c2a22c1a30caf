"""Loss-spike detection against a rolling baseline of accepted steps."""

import math
from collections import deque
from dataclasses import dataclass

from moetron.config.monitor import SpikeConfig


@dataclass
class Verdict:
    kind: str  # "ok" | "nonfinite" | "loss_spike" | "grad_spike"
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


class SpikeDetector:
    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.history: deque[tuple[int, float, float]] = deque(maxlen=cfg.window)  # (step, loss, grad_norm)

    def judge(self, step: int, loss: float, grad_norm: float) -> Verdict:
        """Judge a step before its update is applied; accepted steps join the baseline."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return Verdict("nonfinite", f"loss={loss} grad_norm={grad_norm}")
        verdict = self._compare("loss_spike", loss, [h[1] for h in self.history])
        if verdict.ok and self.cfg.check_grad_norm:
            verdict = self._compare("grad_spike", grad_norm, [h[2] for h in self.history])
        if verdict.ok:
            self.history.append((step, loss, grad_norm))
        return verdict

    def _compare(self, kind: str, value: float, past: list[float]) -> Verdict:
        if len(past) < self.cfg.min_history:
            return Verdict("ok")
        mean = sum(past) / len(past)
        std = math.sqrt(sum((x - mean) ** 2 for x in past) / (len(past) - 1))
        threshold = max(mean + self.cfg.sigmas * std, mean * self.cfg.min_ratio)
        if value > threshold:
            return Verdict(kind, f"{value:.4g} > {threshold:.4g} (mean {mean:.4g}, std {std:.3g})")
        return Verdict("ok")

    def forget_after(self, step: int) -> None:
        """After a rollback to `step`, later steps are no longer part of the run's history."""
        kept = [h for h in self.history if h[0] <= step]
        self.history.clear()
        self.history.extend(kept)
