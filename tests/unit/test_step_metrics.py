"""Performance figures as a GPU user reads them: per-device throughput and MFU against hand-computed values,
the per-rank table's summary, the wait clock, and the expert-load-over-time data of the report."""

import math
import time
from types import SimpleNamespace

import pytest
import torch

from moetron.model.flops import achieved_tflops_per_device, mfu_per_device
from moetron.report import load_over_time
from moetron.train import perf
from moetron.train.timing import PhaseClock, WaitClock, share
from moetron.train.trainer import Trainer


def test_mfu_is_one_devices_share_over_one_devices_peak():
    # 8 devices together train 4000 tokens/s at 6 GFLOP per token: 24 TFLOP/s in all, 3 TFLOP/s each; one
    # device's peak is 400 TFLOP/s, so each runs at 3 / 400 = 0.75 %.
    assert achieved_tflops_per_device(4000, 6e9, 8) == pytest.approx(3.0)
    assert mfu_per_device(4000, 6e9, 8, 400) == pytest.approx(0.0075)


class _Lines:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


def test_trainer_logs_global_and_per_device_throughput():
    """Trainer.log on a world of 8 (the method on a stand-in trainer: no processes needed)."""
    stand_in = SimpleNamespace(world=8, flops_per_token=6e9, cfg=SimpleNamespace(monitor=SimpleNamespace(
        peak_tflops=400.0)), metrics=_Lines(), sink=None)
    record = {"step": 1, "loss": 1.0}
    Trainer.log(stand_in, record, 4000.0)
    logged = stand_in.metrics.records[-1]
    assert logged["tokens_per_s"] == 4000.0  # global: every replica together
    assert logged["tokens_per_s_per_device"] == 500.0
    assert logged["tflops_per_device"] == pytest.approx(3.0)
    assert logged["mfu"] == pytest.approx(0.0075)


def test_summary_takes_rank0s_time_the_largest_memory_and_the_mean_wait_share():
    rows = []
    for rank, (rss, step_time, ep, dp) in enumerate([(100.0, 2.0, 0.5, 0.2), (300.0, 4.0, 2.0, 0.0)]):
        values = {"peak_rss_mb": rss, "peak_device_allocated_mb": 10.0 * (rank + 1),
                  "peak_device_reserved_mb": 20.0 * (rank + 1), "step_time": step_time, "time_data": 0.1,
                  "time_forward_backward": 1.0, "time_optimizer": 0.5, "time_checkpoint": 0.0,
                  "ep_wait": ep, "dp_wait": dp}
        rows.append([values[c] for c in perf.COLUMNS])
    record, per_rank = perf.summarize(torch.tensor(rows, dtype=torch.float64), on_gpu=True)
    assert record["step_time"] == 2.0 and record["time_forward_backward"] == 1.0
    assert record["ep_wait_share"] == pytest.approx((0.5 / 2 + 2.0 / 4) / 2)
    assert record["dp_wait_share"] == pytest.approx((0.2 / 2 + 0.0) / 2)
    assert record["peak_rss_mb"] == 300.0 and record["peak_device_allocated_mb"] == 20.0
    assert record["peak_device_reserved_mb"] == 40.0
    assert per_rank["peak_rss_mb"] == [100.0, 300.0] and per_rank["ep_wait_share"] == [0.25, 0.5]
    cpu_record, cpu_ranks = perf.summarize(torch.tensor(rows, dtype=torch.float64), on_gpu=False)
    assert "peak_device_allocated_mb" not in cpu_record and "peak_device_reserved_mb" not in cpu_ranks


def test_share_stays_in_unit_interval():
    assert share(0.5, 2.0) == 0.25
    assert share(3.0, 2.0) == 1.0 and share(-1e-9, 2.0) == 0.0 and share(1.0, 0.0) == 0.0


def test_clocks_sum_what_they_measure_and_start_again_after_take():
    cpu = torch.device("cpu")
    clock = WaitClock(cpu)
    for _ in range(2):
        with clock.measure():
            time.sleep(0.02)
    assert clock.take() >= 0.04  # a lower bound: sleep never returns early
    assert clock.take() == 0.0
    phases = PhaseClock(cpu)
    with phases.phase("data"):
        time.sleep(0.01)
    taken = phases.take()
    assert taken["data"] >= 0.01 and taken["optimizer"] == 0.0
    assert phases.take()["data"] == 0.0


def test_expert_load_over_time_has_one_row_per_layer_and_expert():
    records = [{"step": 10, "load": [[1.0, 2.0, 0.0], [0.5, 1.5, 1.0]]},
               {"step": 20, "load": [[1.1, 0.9, 1.0]]}]  # a record without the second layer
    steps, rows, experts = load_over_time(records)
    assert steps == [10, 20] and experts == 3 and len(rows) == 6
    assert rows[1] == [2.0, 0.9]  # layer 0, expert 1
    assert rows[3][0] == 0.5 and math.isnan(rows[3][1])  # layer 1, expert 0: missing at step 20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_wait_clock_times_the_stream_and_memory_is_the_devices():
    """A wait blocks the compute stream, not the host: the clock must see GPU time the host never waits for."""
    from moetron import device as dev

    device = dev.choose_device("cuda", 0)
    clock = WaitClock(device)
    with clock.measure():
        torch.cuda._sleep(100_000_000)  # tens of milliseconds of stream time, queued without blocking the host
    assert clock.take() > 0.005
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    row = perf.rank_row(device, 1.0, dict.fromkeys(("data", "forward_backward", "optimizer", "checkpoint"), 0.0),
                        0.0, 0.0)
    values = dict(zip(perf.COLUMNS, row.tolist()))
    assert values["peak_device_allocated_mb"] >= 64 and values["peak_device_reserved_mb"] >= 64
    del block
