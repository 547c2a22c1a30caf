"""Fault tests: spikes rolled back, NaN skipped, a killed rank restarted by torchrun, a save interrupted
by a kill, a truncated checkpoint, and the offline wandb run read back."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from test_trainer import make_config, run_cli

from moetron.config import FaultConfig, SpikeConfig
from moetron.monitor.wandb_read import read_offline_run
from moetron.train.trainer import Trainer


def events(run_dir):
    return [json.loads(x) for x in open(run_dir / "events.jsonl")]


def metrics(run_dir):
    return [json.loads(x) for x in open(run_dir / "metrics.jsonl")]


def spike_config(corpus, run_dir, steps, policy, faults, **run):
    config = make_config(corpus, run_dir, steps, **run)
    config.monitor.spike = SpikeConfig(policy=policy, window=10, min_history=5, sigmas=4.0,
                                       rollback_skip_batches=3)
    config.monitor.faults = faults
    return config


def test_spike_is_rolled_back_with_its_data_window_skipped(corpus, tmp_path):
    clean = Trainer(spike_config(corpus, tmp_path / "clean", 24, "rollback", [], save_every=4))
    clean.fit()
    spiked = Trainer(spike_config(corpus, tmp_path / "spiked", 24, "rollback",
                                  [FaultConfig(step=14, kind="scale_loss", value=50.0)], save_every=4))
    spiked.fit()
    log = events(tmp_path / "spiked")
    spike = next(e for e in log if e["event"] == "loss_spike")
    rollback = next(e for e in log if e["event"] == "rollback")
    assert spike["step"] == 14 and spike["action"] == "rollback"
    assert rollback["to_step"] == 12 and rollback["skipped_sequences"] > 0
    steps = [m["step"] for m in metrics(tmp_path / "spiked")]
    assert steps == sorted(set(steps)) and steps[-1] == 24  # no duplicated steps after the rollback
    final_clean, final_spiked = metrics(tmp_path / "clean")[-1], metrics(tmp_path / "spiked")[-1]
    assert abs(final_spiked["lm_loss"] - final_clean["lm_loss"]) < 0.1 * final_clean["lm_loss"]


def test_nan_loss_skips_the_update_and_leaves_weights_unchanged(corpus, tmp_path):
    trainer = Trainer(spike_config(corpus, tmp_path / "run", 6, "rollback", [FaultConfig(step=3, kind="nan_loss")]))
    trainer.start()
    trainer.train_step()
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = {i: b.exp_avg.clone() for i, b in enumerate(trainer.optimizer.buckets)}
    assert moments and all(m.abs().sum() > 0 for m in moments.values())  # two applied steps moved them
    tokens = trainer.state.tokens
    record = trainer.train_step()
    assert record["action"] == "skip"
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[key]), key  # including the balancing biases
    for i, bucket in enumerate(trainer.optimizer.buckets):
        assert torch.equal(bucket.exp_avg, moments[i]), i
    assert trainer.state.tokens == tokens and trainer.state.step == 3
    assert [e["event"] for e in events(tmp_path / "run")][-1] == "nonfinite"
    assert trainer.train_step()["action"] == "apply"


def test_killed_rank_is_restarted_by_torchrun_and_resumes_exactly(corpus, tmp_path):
    data = [f"data.train_files=[{corpus['train']}]", f"data.val_files=[{corpus['val']}]", "data.tokenizer=null"]
    common = [*data, "train.seq_len=32", "train.eval_every=0", "run.progress=false", "run.save_every=5",
              "train.steps=40", "monitor.wandb=false", "monitor.report=false"]
    straight = run_cli(f"run.dir={tmp_path / 'a'}", *common, cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--max-restarts=1",
         "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "-m", "moetron.train",
         f"run.dir={tmp_path / 'b'}", *common],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the first checkpoint, then kill the worker mid-run
        log = events(tmp_path / "b") if (tmp_path / "b" / "events.jsonl").exists() else []
        if any(e["event"] == "checkpoint" for e in log):
            break
        time.sleep(0.2)
    worker = next(e["pid"] for e in log if e["event"] == "start")
    os.kill(worker, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    resumed = [e for e in events(tmp_path / "b") if e["event"] == "resume"]
    assert resumed and resumed[0]["restart_count"] == 1
    assert [m["loss"] for m in metrics(tmp_path / "a")] == [m["loss"] for m in metrics(tmp_path / "b")]


def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(corpus, tmp_path):
    data = [f"data.train_files=[{corpus['train']}]", f"data.val_files=[{corpus['val']}]", "data.tokenizer=null"]
    common = [*data, "train.seq_len=32", "train.eval_every=0", "run.progress=false", "run.save_every=4",
              "train.steps=12", "monitor.wandb=false", "monitor.report=false"]
    crash = "monitor.faults=[{step:8,kind:crash_in_checkpoint}]"
    first = run_cli(f"run.dir={tmp_path / 'run'}", *common, crash, cwd=tmp_path)
    assert first.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) == ["step_00000004"]
    assert any(p.name.startswith(".step_00000008.tmp") for p in checkpoints.iterdir())  # the half-written one
    second = run_cli(f"run.dir={tmp_path / 'run'}", *common, crash, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    log = events(tmp_path / "run")
    assert any(e["event"] == "checkpoint_discarded" for e in log)
    assert next(e for e in log if e["event"] == "resume")["step"] == 4
    clean = run_cli(f"run.dir={tmp_path / 'clean'}", *common, cwd=tmp_path)
    assert clean.returncode == 0
    assert [m["loss"] for m in metrics(tmp_path / "clean")] == [m["loss"] for m in metrics(tmp_path / "run")]


def wandb_diagnostics(run_dir, run) -> str:
    """What to look at when the offline run lacks rows: its files, their sizes, the service's own log."""
    files = {str(p.relative_to(run_dir)): p.stat().st_size for p in run_dir.glob("wandb/**/*") if p.is_file()}
    logs = [p.read_text()[-2000:] for p in run_dir.glob("wandb/offline-run-*/logs/debug*.log")]
    return f"{len(run.history)} history rows; files {files}; logs:\n" + "\n".join(logs)


def test_offline_wandb_run_holds_metrics_and_spike_events(corpus, tmp_path):
    config = spike_config(corpus, tmp_path / "run", 12, "skip", [FaultConfig(step=9, kind="scale_loss", value=50.0)])
    config.monitor.wandb, config.monitor.report = True, True
    Trainer(config).fit()
    run = read_offline_run(tmp_path / "run")
    losses = {row["trainer/step"]: row["train/loss"] for row in run.history if "train/loss" in row}
    logged = {m["step"]: m["loss"] for m in metrics(tmp_path / "run")}
    assert losses.keys() == logged.keys(), wandb_diagnostics(tmp_path / "run", run)
    assert all(abs(losses[s] - logged[s]) <= 1e-5 * abs(logged[s]) for s in logged)
    assert any(row.get("events/loss_spike") == 1 and row["trainer/step"] == 9 for row in run.history)
    assert any(row.get("events/skip") == 1 and row["trainer/step"] == 9 for row in run.history)  # policy skip
    assert any("loss_spike at step 9" in alert["title"] for alert in run.alerts)
    last = max((row for row in run.history if "perf/tokens_per_s_per_device" in row), key=lambda r: r["trainer/step"])
    for key in ("perf/tflops_per_device", "time/time_forward_backward", "time/time_checkpoint",
                "comm/ep_wait_share", "comm/dp_wait_share", "memory/peak_rss_mb"):
        assert key in last, key
    assert abs(last["perf/tokens_per_s_per_device"] / metrics(tmp_path / "run")[-1]["tokens_per_s_per_device"] - 1) < 1e-5
    assert any(row.get("balance/expert_load_heatmap/_type") == "image-file" for row in run.history)
    assert (tmp_path / "run" / "report.png").exists()


def test_grad_norm_spikes_follow_their_own_policy(corpus, tmp_path):
    from moetron.monitor import Verdict

    trainer = Trainer(spike_config(corpus, tmp_path / "run", 4, "rollback", []))
    trainer.start()
    assert trainer.decide(3, Verdict("grad_spike", "x"), 3.0, 9.0) == "apply"  # default grad_policy: warn
    trainer.cfg.monitor.spike.grad_policy = "skip"
    assert trainer.decide(3, Verdict("grad_spike", "x"), 3.0, 9.0) == "skip"
    assert trainer.decide(3, Verdict("loss_spike", "x"), 9.0, 1.0) == "skip"  # no checkpoint before step 3 yet
    assert [e["action"] for e in events(tmp_path / "run") if e["event"].endswith("spike")] == ["apply", "skip", "skip"]
