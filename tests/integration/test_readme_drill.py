"""The README's fault drill, as written: `monitor.faults=[{step:40,kind:corrupt_batch}]` on `tiny` (one
process) is caught as a loss spike at step 40 and rolled back to the checkpoint before it. A batch of noise
at step 40 has a loss near 11.5 while the loss is still falling fast (7.3 at step 1, about 4 at step 30):
judged against the window's mean and spread, the descent itself hid it."""

import json
import re
from pathlib import Path

from test_trainer import run_cli

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_corrupt_batch_drill_is_caught_and_rolled_back(corpus, tmp_path):
    drill = re.search(r"`(monitor\.faults=\[\{step:(\d+),kind:corrupt_batch\}\])`", README.read_text())
    assert drill, "the README no longer shows the corrupt_batch drill"
    override, step = drill.group(1), int(drill.group(2))
    run_dir = tmp_path / "run"
    done = run_cli(f"run.dir={run_dir}", "model=tiny", f"train.steps={step + 4}", override,
                   f"data.train_files=[{corpus['train']}]", f"data.val_files=[{corpus['val']}]", "data.tokenizer=null",
                   "run.progress=false", "monitor.wandb=false", "monitor.report=false", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in open(run_dir / "events.jsonl")]
    spikes = [e for e in events if e["event"] == "loss_spike"]
    assert [(e["step"], e["action"]) for e in spikes] == [(step, "rollback")], spikes
    (rollback,) = [e for e in events if e["event"] == "rollback"]
    assert rollback["step"] == step and rollback["to_step"] < step
    assert events[-1]["event"] == "finish"
