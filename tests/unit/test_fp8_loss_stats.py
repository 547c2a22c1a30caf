"""benchmarks/fp8_loss.py's statistics against hand-computed values: the seed-averaged relative error, the
paired difference with its Student's t interval, and the noise floor from the BF16 thread-count twins."""

from __future__ import annotations

import math

import pytest
from helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("fp8_loss")


def run(name: str, final: float, steps: int = 6, last: int = 2) -> dict:
    """A run whose last `last` losses average to `final` (the earlier ones far off, so a wrong window shows)."""
    losses = [100.0] * (steps - last) + [final - 0.5, final + 0.5]
    records = [{"step": i + 1, "loss": loss, "step_time": 1.0, "val_loss": final + 1} for i, loss in enumerate(losses)]
    return {"name": name, "records": records, "wall_s": 1.0}


def test_noise_floor_is_t_times_rms_of_the_twin_differences_over_sqrt_seeds(bench):
    null = [0.001, -0.002, 0.0015]
    rms = math.sqrt((1e-6 + 4e-6 + 2.25e-6) / 3)
    assert bench.noise_floor(null) == pytest.approx(3.182 * rms / math.sqrt(3))  # t(0.975, 3 dof)
    assert bench.noise_floor(null) == pytest.approx(2.856e-3, rel=1e-3)


def test_summary_of_three_seeds(bench):
    args = bench.parse_args(["--seeds", "3", "--steps", "6", "--last", "2", "--baseline", "fp32"])
    base, fp8, twin = [4.0, 5.0, 4.5], [4.01, 4.99, 4.53], [4.004, 4.99, 4.5045]
    runs = {}
    for s in range(3):
        for name, value in ((f"base_s{s}", base[s]), (f"fp8_s{s}", fp8[s]), (f"base_s{s}_t2", twin[s])):
            runs[name] = run(name, value)
    out = bench.summarize(args, runs, {"base": 0.5, "fp8": 0.7})
    assert out["relative_loss_error"] == pytest.approx(abs(sum(fp8) - sum(base)) / sum(base))  # 0.03 / 13.5
    paired = [0.01 / 4.0, -0.01 / 5.0, 0.03 / 4.5]
    mean = sum(paired) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in paired) / 2)
    assert out["relative_loss_difference"] == pytest.approx(mean)
    assert out["relative_loss_difference_ci95"] == pytest.approx([mean - 4.303 * sd / math.sqrt(3),
                                                                 mean + 4.303 * sd / math.sqrt(3)])
    null = [0.001, -0.002, 0.001]
    assert out["baseline_thread_difference_per_seed"] == pytest.approx(null)
    assert out["noise_floor"] == pytest.approx(3.182 * math.sqrt(sum(d * d for d in null) / 3) / math.sqrt(3))
    assert out["fp8_within_noise"] is (out["relative_loss_error"] <= out["noise_floor"])
    assert out["baseline_seed_spread"] == pytest.approx(0.5 / 4.5)
    assert out["relative_val_loss_error"] == pytest.approx(0.03 / 16.5)
    assert out["fp8_step_time_ratio"] == pytest.approx(1.4)


def test_the_tiny_schedule_compressed_into_fewer_steps_runs_every_stage(bench):
    """compress_schedule(train, 150) against the tiny schedule itself: every token-driven stage is where the
    300-step schedule has it at twice the tokens, the warm-up takes half the steps, and 150 steps, like the
    original's 300 at the study's micro-batch of 8 sequences, end where the cosine decay reaches its floor."""
    from moetron.config import TrainConfig
    from moetron.train import schedules

    original = bench.preset(TrainConfig, "train", "tiny")
    compressed = bench.preset(TrainConfig, "train", "tiny")
    bench.compress_schedule(compressed, 150)
    assert compressed.steps == 150 and compressed.optim.warmup_steps == original.optim.warmup_steps // 2
    for tokens in (0, 20e3, 60e3, 100e3, 180e3, 260e3, 280e3, 292e3):
        for fn in (schedules.mtp_lambda, schedules.bias_update_rate, schedules.batch_size):
            assert fn(compressed, tokens) == fn(original, 2 * tokens), (fn.__name__, tokens)
        assert schedules.learning_rate(compressed.optim, 10**6, tokens) == pytest.approx(
            schedules.learning_rate(original.optim, 10**6, 2 * tokens), rel=1e-12)
    for step in range(compressed.optim.warmup_steps):
        assert schedules.learning_rate(compressed.optim, step, 0) == pytest.approx(
            schedules.learning_rate(original.optim, 2 * step + 1, 0))
    for train in (original, compressed):
        tokens = 0
        for _ in range(train.steps - 1):
            tokens += schedules.batch_size(train, tokens) * train.seq_len
        last_lr = schedules.learning_rate(train.optim, train.steps - 1, tokens)
        assert last_lr == pytest.approx(train.optim.min_lr, rel=1e-3) and last_lr > train.optim.final_lr


def test_the_twins_run_after_the_others_in_the_same_number_of_threads(bench):
    """No wave runs more threads than --jobs x --threads: 2 x 1-thread runs, then the 2-thread twins alone."""
    args = bench.parse_args(["--seeds", "3"])
    jobs = [(run, None) for run in bench.plan_runs(args)]
    (ours, ours_at_once), (twins, twins_at_once) = bench.waves(args, jobs)
    assert sorted(r["name"] for r, _ in ours + twins) == sorted(r["name"] for r, _ in jobs)  # each run once
    assert {r["threads"] for r, _ in ours} == {1} and {r["threads"] for r, _ in twins} == {2}
    assert ours_at_once * 1 <= 2 and twins_at_once * 2 <= 2 and ours_at_once == 2 and twins_at_once == 1
    args = bench.parse_args(["--seeds", "3", "--threads", "2", "--jobs", "2"])  # twins at 1 thread: 4 at a time
    assert bench.waves(args, [])[1][1] == 4
