"""Spike detection, fault injection and the wandb dashboard's contract with the logged keys."""

import math

import pytest
import torch
import yaml

from moetron.config import ConfigError, FaultConfig, MonitorConfig, SpikeConfig
from moetron.config.monitor import validate_monitor
from moetron.monitor import FaultInjector, SpikeDetector
from moetron.monitor.dashboard import load_dashboard
from moetron.monitor.wandb_sink import wandb_record


def detector(**overrides) -> SpikeDetector:
    return SpikeDetector(SpikeConfig(**{"window": 20, "min_history": 10, "sigmas": 4.0, **overrides}))


def noisy(step: int) -> float:
    return 3.0 + 0.05 * math.sin(step)  # a flat, slightly noisy loss


def test_no_judgement_before_min_history_then_spikes_are_found():
    d = detector()
    for step in range(1, 10):
        assert d.judge(step, 100.0 if step == 5 else noisy(step), 1.0).ok  # too little history to judge
    d = detector()
    for step in range(1, 30):
        assert d.judge(step, noisy(step), 1.0).ok
    verdict = d.judge(30, 4.0, 1.0)
    assert verdict.kind == "loss_spike" and "mean" in verdict.detail
    assert d.judge(31, noisy(31), 50.0).kind == "grad_spike"
    assert d.judge(32, noisy(32), 1.0).ok  # spikes did not enter the baseline


def test_nonfinite_is_always_caught():
    d = detector()
    assert d.judge(1, float("nan"), 1.0).kind == "nonfinite"
    assert d.judge(2, 1.0, float("inf")).kind == "nonfinite"


def test_falling_loss_is_not_a_spike():
    d = detector()
    assert all(d.judge(step, 10.0 / step, 5.0 / step).ok for step in range(1, 200))


def test_state_round_trip_judges_like_the_original():
    """A detector restored from state() (a checkpoint) judges the next steps exactly as the original."""
    d = detector()
    for step in range(1, 21):
        d.judge(step, noisy(step), 1.0)
    restored = detector()
    restored.load_state(d.state())
    assert list(restored.history) == list(d.history)
    for step, loss in ((21, noisy(21)), (22, 100.0), (23, noisy(23))):
        assert restored.judge(step, loss, 1.0) == d.judge(step, loss, 1.0)


def test_faults_fire_once_and_not_after_a_restart():
    fired = []
    faults = [FaultConfig(step=3, kind="nan_loss"), FaultConfig(step=4, kind="scale_loss", value=7.0),
              FaultConfig(step=5, kind="corrupt_batch")]
    injector = FaultInjector(faults, on_fire=lambda step, kind: fired.append((step, kind)))
    assert math.isnan(injector.loss_factor(3)) and injector.loss_factor(3) == 1.0
    assert injector.loss_factor(4) == 7.0
    batch = torch.zeros(2, 8, dtype=torch.long)
    assert not torch.equal(injector.batch(5, batch, 100), batch)
    assert fired == [(3, "nan_loss"), (4, "scale_loss"), (5, "corrupt_batch")]
    restarted = FaultInjector(faults, fired=set(fired))
    assert restarted.loss_factor(3) == 1.0 and restarted.loss_factor(4) == 1.0


def test_bad_monitor_values_name_the_field():
    with pytest.raises(ConfigError, match="`monitor.spike.policy`"):
        validate_monitor(MonitorConfig(spike=SpikeConfig(policy="panic")))
    with pytest.raises(ConfigError, match=r"`monitor.faults\[0\].kind`"):
        validate_monitor(MonitorConfig(faults=[FaultConfig(step=1, kind="meteor")]))


def test_dashboard_panels_use_only_keys_the_trainer_logs():
    record = {"step": 1, "loss": 1.0, "lm_loss": 1.0, "mtp_loss": 0.1, "bal_loss": 0.0, "val_loss": 1.0,
              "grad_norm": 1.0, "lr": 1e-3, "batch_size": 8, "mtp_lambda": 0.3, "bias_update_rate": 1e-3,
              "tokens": 10, "tokens_per_s": 5.0, "step_time": 0.1, "mfu": 0.1, "max_vio": 0.2,
              "bias_absmax": 0.0, "bias_std": 0.0, "max_vio_layers": [0.1, 0.2], "tokens_per_s_per_device": 2.5,
              "tflops_per_device": 1.0, "time_data": 0.01, "time_forward_backward": 0.05, "time_optimizer": 0.02,
              "time_checkpoint": 0.0, "ep_wait_share": 0.1, "dp_wait_share": 0.1, "peak_rss_mb": 300.0,
              "peak_device_allocated_mb": 100.0, "peak_device_reserved_mb": 120.0}
    logged = set(wandb_record(record))
    logged |= {f"events/{kind}" for kind in ("loss_spike", "grad_spike", "nonfinite", "skip", "rollback")}
    logged.add("balance/expert_load_heatmap")
    for section in load_dashboard()["sections"]:
        for panel in section["panels"]:
            for key in panel.get("y", []) + ([panel["key"]] if "key" in panel else []):
                assert key in logged, f"dashboard panel {panel['title']!r} plots {key!r}, which is never logged"
    assert yaml.safe_load(open("hydra_conf/config.yaml"))  # the config tree stays valid YAML
