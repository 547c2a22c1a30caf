"""Checkpoint integrity through the trainer: flipped payload bytes are caught by the manifest, the damaged
checkpoint is named and moved aside (never loaded, not counted among the kept ones), the run resumes from
the newest sound one; and a run whose steps stay non-finite stops with exit 1 keeping its finite checkpoints."""

import json

import torch
from test_faults import events, spike_config
from test_trainer import make_config, run_cli

from moetron.config import FaultConfig
from moetron.train.trainer import Trainer


def flip_payload_bytes(step_dir, count=64):
    shard = max((p for p in step_dir.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard


def test_flipped_bytes_move_the_checkpoint_aside_and_resume_from_the_previous(corpus, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(make_config(corpus, run_dir, steps=4, save_every=1, keep_checkpoints=3)).fit()
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000003", "step_00000004"]
    shard = flip_payload_bytes(checkpoints / "step_00000004")

    resumed = Trainer(make_config(corpus, run_dir, steps=5, save_every=1, keep_checkpoints=3))
    resumed.fit()
    log = events(run_dir)
    skipped = [e for e in log if e["event"] == "checkpoint_skipped"]
    assert len(skipped) == 1 and shard.name in skipped[0]["reason"] and "corrupt" in skipped[0]["reason"]
    resume = [e for e in log if e["event"] == "resume"][-1]
    assert resume["step"] == 3  # the newest sound checkpoint
    # the damaged one is aside (not counted): the kept three are all sound, step 3 was not pruned for it
    assert {p.name for p in checkpoints.iterdir()} == {"step_00000003", "step_00000004", "step_00000005",
                                                       "step_00000004.corrupt"}
    assert resumed.state.step == 5


def test_rollback_never_chooses_a_damaged_checkpoint(corpus, tmp_path):
    """A loss spike at step 14 rolls back to step 12's checkpoint, which is damaged: it is moved aside and the
    rollback goes to step 8's instead."""
    run_dir = tmp_path / "run"
    trainer = Trainer(spike_config(corpus, run_dir, 24, "rollback",
                                   [FaultConfig(step=14, kind="scale_loss", value=50.0)], save_every=4))
    trainer.start()
    while trainer.state.step < 13:
        trainer.train_step()
        if trainer.state.step % 4 == 0:
            trainer.save()
    flip_payload_bytes(run_dir / "checkpoints" / "step_00000012")
    record = trainer.train_step()  # step 14: the spike
    assert record["action"] == "rollback"
    rollback = [e for e in events(run_dir) if e["event"] == "rollback"][-1]
    assert rollback["to_step"] == 8 and trainer.state.step == 8
    assert (run_dir / "checkpoints" / "step_00000012.corrupt").is_dir()
    assert "step_00000012" not in {p.name for p in trainer.checkpoints.complete()}


def test_consecutive_nonfinite_steps_stop_with_exit_1(corpus, tmp_path):
    """train.max_nonfinite_steps=3 and NaN losses at steps 3, 4, 5: exit 1 after step 5, with the steps-2
    checkpoint (finite) kept and nothing saved from the NaN steps."""
    config = spike_config(corpus, tmp_path / "run", 8, "skip",
                          [FaultConfig(step=s, kind="nan_loss") for s in (3, 4, 5)], save_every=2)
    data = [f"data.train_files=[{corpus['train']}]", f"data.val_files=[{corpus['val']}]", "data.tokenizer=null"]
    faults = "monitor.faults=[" + ",".join(f"{{step:{s},kind:nan_loss}}" for s in (3, 4, 5)) + "]"
    out = run_cli(f"run.dir={tmp_path / 'run'}", *data, "train.steps=8", "train.seq_len=32", "train.eval_every=0",
                  "run.progress=false", "monitor.wandb=false", "run.save_every=2", "train.max_nonfinite_steps=3",
                  faults, cwd=tmp_path)
    assert config.train.max_nonfinite_steps == 10  # the default, which the CLI run overrides
    assert out.returncode == 1, out.stderr
    assert "train.max_nonfinite_steps=3" in out.stderr and "Traceback" not in out.stderr
    log = [json.loads(x) for x in open(tmp_path / "run" / "events.jsonl")]
    assert [e["step"] for e in log if e["event"] == "nonfinite"] == [3, 4, 5]
    assert log[-1]["event"] == "diverged" and log[-1]["step"] == 5
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved == ["step_00000002"]
    from moetron.checkpoint import CheckpointStore
    from moetron.checkpoint.store import read_train_state

    assert read_train_state(CheckpointStore(tmp_path / "run" / "checkpoints").complete()[-1])["step"] == 2
    assert torch.isfinite(torch.tensor([r["lm_loss"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))
                                        if r["step"] <= 2])).all()
