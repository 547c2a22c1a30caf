"""Preemption: SIGUSR1 (Slurm's --signal) or Ctrl-C (SIGINT) mid-run -> finish the step, checkpoint, exit 75;
the rerun resumes from that checkpoint with no step repeated or lost."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_trainer import run_cli


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT], ids=["SIGUSR1", "SIGINT"])
def test_signal_checkpoints_and_the_rerun_resumes_exactly(corpus, tmp_path, signum):
    data = [f"data.train_files=[{corpus['train']}]", f"data.val_files=[{corpus['val']}]", "data.tokenizer=null"]
    common = [*data, "train.seq_len=32", "train.eval_every=0", "run.progress=false", "run.save_every=100",
              "train.steps=60", "monitor.wandb=false", "monitor.report=false"]
    straight = run_cli(f"run.dir={tmp_path / 'a'}", *common, cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr

    run_dir = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "moetron.train", f"run.dir={run_dir}", *common], cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "SLURM_RESTART_COUNT": "0"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.1)
    time.sleep(1.0)  # a few steps in, between checkpoints
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    assert f"stopped by {signum.name}" in stdout and "Traceback" not in stderr
    events = [json.loads(x) for x in open(run_dir / "events.jsonl")]
    stop = next(e for e in events if e["event"] == "preempted")
    assert 0 < stop["step"] < 60 and stop["signal"] == signum.name
    assert (run_dir / "checkpoints" / f"step_{stop['step']:08d}").is_dir()

    resumed = run_cli(f"run.dir={run_dir}", *common, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    b = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
