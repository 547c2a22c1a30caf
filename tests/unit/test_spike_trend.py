"""Spikes are judged against the trend of the window, so a spike during the early descent is found (the
README's corrupt_batch drill at step 40 of `tiny`), while the descent itself and flat noise are not spikes."""

import math

from moetron.config import SpikeConfig
from moetron.monitor import SpikeDetector


def early_descent(step: int) -> float:
    """The shape of `tiny`'s first steps: 7.3 falling towards 4 with a little noise."""
    return 3.8 + 3.5 * math.exp(-step / 10) + 0.05 * math.sin(3 * step)


def test_spike_during_the_early_descent_is_found():
    d = SpikeDetector(SpikeConfig())  # the defaults: window 50, 20 steps of history, 6 sigmas
    for step in range(1, 40):
        assert d.judge(step, early_descent(step), 1.0).ok, step  # the descent itself is not a spike
    verdict = d.judge(40, 11.5, 1.0)  # a batch of noise: what the README's corrupt_batch drill gives
    assert verdict.kind == "loss_spike" and "trend" in verdict.detail
    assert d.judge(41, early_descent(41), 1.0).ok


def test_rising_or_flat_noise_is_not_a_spike():
    d = SpikeDetector(SpikeConfig(window=20, min_history=10, sigmas=4.0))
    for step in range(1, 200):  # a slow upward drift (e.g. a warm-up) with noise
        assert d.judge(step, 3.0 + 0.002 * step + 0.05 * math.sin(step), 1.0).ok, step
