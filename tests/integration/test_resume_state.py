"""What a resumed run must remember, and who may write a run directory.

- The spike detector's window is in the checkpoint: stopped at step 25 and resumed, a x100 loss at step 30 is
  rolled back exactly as in the uninterrupted run (before, the resumed run had no history for `min_history`
  steps and applied the spike). Resumed == uninterrupted, bitwise, across the spike.
- A second trainer on a run.dir that a running trainer holds is refused (exit 2) naming the holder's pid.
"""

import os
import subprocess
import sys
import time

from test_faults import events, metrics, spike_config
from test_trainer import run_cli

from moetron.config import FaultConfig
from moetron.train.trainer import Trainer


def config(corpus, run_dir, steps):
    return spike_config(corpus, run_dir, steps, "rollback", [FaultConfig(step=30, kind="scale_loss", value=100.0)],
                        save_every=5)


def test_resume_across_a_spike_equals_the_uninterrupted_run(corpus, tmp_path):
    Trainer(config(corpus, tmp_path / "straight", 34)).fit()
    Trainer(config(corpus, tmp_path / "resumed", 25)).fit()  # stopped at step 25 (its checkpoint)
    Trainer(config(corpus, tmp_path / "resumed", 34)).fit()
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    spikes = [(e["step"], e["action"]) for e in events(tmp_path / "resumed") if e["event"] == "loss_spike"]
    assert spikes == [(30, "rollback")]
    assert [(e["step"], e["action"]) for e in events(tmp_path / "straight") if e["event"] == "loss_spike"] == spikes
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # bitwise


def test_a_second_trainer_on_a_held_run_dir_is_refused(corpus, tmp_path):
    data = [f"data.train_files=[{corpus['train']}]", f"data.val_files=[{corpus['val']}]", "data.tokenizer=null"]
    common = [*data, "train.seq_len=32", "train.eval_every=0", "run.progress=false", "monitor.wandb=false",
              "monitor.report=false", f"run.dir={tmp_path / 'run'}"]
    first = subprocess.Popen([sys.executable, "-m", "moetron.train", *common, "train.steps=400"], cwd=tmp_path,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "run" / "metrics.jsonl").exists():
            time.sleep(0.1)
        second = run_cli(*common, "train.steps=400", cwd=tmp_path)
        assert second.returncode == 2, second.stderr
        assert "`run.dir`" in second.stderr and f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run is untouched and still training
    finally:
        first.kill()
        first.communicate()
