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
        """Is `value` above the window's linear trend, extrapolated to this step, by `sigmas` standard deviations
        of the window around that trend? The trend, not the mean: early in a run the loss falls fast (7 -> 4
        over 30 steps on `tiny`), so the spread around the mean is the descent itself and mean + 6 std would
        exceed even the loss of a batch of noise. On a flat curve the trend is the mean, as before."""
        if len(past) < self.cfg.min_history:
            return Verdict("ok")
        n = len(past)
        mean = sum(past) / n
        centre = (n - 1) / 2
        slope = sum((i - centre) * (x - mean) for i, x in enumerate(past)) / sum((i - centre) ** 2 for i in range(n))
        trend = mean + slope * (n - centre)  # the fitted line one step past the window
        residuals = [x - (mean + slope * (i - centre)) for i, x in enumerate(past)]
        std = math.sqrt(sum(r * r for r in residuals) / max(n - 2, 1))
        threshold = max(trend + self.cfg.sigmas * std, min(trend, mean) * self.cfg.min_ratio)
        if value > threshold:
            return Verdict(kind, f"{value:.4g} > {threshold:.4g} (trend {trend:.4g}, std around it {std:.3g}, "
                                 f"mean {mean:.4g})")
        return Verdict("ok")

    def state(self) -> list[list[float]]:
        """The baseline window, for checkpoints: a resumed run judges its next steps exactly as the
        uninterrupted run would (no blind `min_history` steps after every restart)."""
        return [list(h) for h in self.history]

    def load_state(self, saved: list) -> None:
        self.history.clear()
        self.history.extend((int(step), float(loss), float(grad)) for step, loss, grad in saved)
