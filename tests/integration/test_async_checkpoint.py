"""run.async_checkpoint: the background write (torch.distributed.checkpoint.async_save) gives the same
checkpoints as the synchronous save, training runs on while it writes, a kill during the write keeps the
previous checkpoint, and a preemption with a write in flight loses nothing.

The reference is always the synchronous path of the same run (same model, data and seed)."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_faults import events, metrics, spike_config
from test_trainer import make_config, run_cli
from torch.distributed.checkpoint import FileSystemWriter

from moetron.checkpoint.manifest import verify_manifest
from moetron.config import ConfigError, FaultConfig
from moetron.train.trainer import Trainer

# DCP's index records the directory it was written to and a random save id; the manifest hashes the index.
UNIQUE_PER_SAVE = {".metadata", "manifest.json"}


def saved_files(checkpoint: Path) -> dict[str, bytes]:
    """Every file of a published checkpoint but the two that differ per save by design: shards, counters."""
    return {p.relative_to(checkpoint).as_posix(): p.read_bytes() for p in sorted(checkpoint.rglob("*"))
            if p.is_file() and p.name not in UNIQUE_PER_SAVE}


def checkpoints(run_dir: Path) -> dict[str, dict[str, bytes]]:
    return {p.name: saved_files(p) for p in sorted((run_dir / "checkpoints").glob("step_*"))}


def run(corpus, run_dir, async_checkpoint, steps=6, **run_overrides) -> Trainer:
    trainer = Trainer(make_config(corpus, run_dir, steps, save_every=2, keep_checkpoints=10,
                                  async_checkpoint=async_checkpoint, **run_overrides))
    trainer.fit()
    return trainer


def test_async_checkpoints_equal_the_synchronous_ones_bitwise(corpus, tmp_path):
    sync = run(corpus, tmp_path / "sync", async_checkpoint=False)
    background = run(corpus, tmp_path / "async", async_checkpoint=True)
    want, got = checkpoints(tmp_path / "sync"), checkpoints(tmp_path / "async")
    assert list(got) == ["step_00000002", "step_00000004", "step_00000006"] == list(want)
    for name in want:
        assert got[name].keys() == want[name].keys(), name
        for file in want[name]:
            assert got[name][file] == want[name][file], (name, file)
    assert [m["loss"] for m in metrics(tmp_path / "async")] == [m["loss"] for m in metrics(tmp_path / "sync")]
    want_params, got_params = sync.model.state_dict(), background.model.state_dict()
    assert all(torch.equal(got_params[k], want_params[k]) for k in want_params)
    published = [e["step"] for e in events(tmp_path / "async") if e["event"] == "checkpoint"]
    assert published == [2, 4, 6]
    assert not list((tmp_path / "async" / "checkpoints").glob(".step_*"))  # no temporary left


def gated_writer(trainer: Trainer, until_step: int, seen: list, only: int | None = None):
    """A DCP writer that holds its shards back until the trainer has finished step `until_step` (or 20 s
    passed: a synchronous save, which blocks the training thread, never gets there); with `only`, just the
    first checkpoint of that step."""

    class Gated(FileSystemWriter):
        def write_data(self, plan, planner):
            if only is not None and (f"step_{only:08d}" not in str(self.path) or seen):
                return super().write_data(plan, planner)
            deadline = time.monotonic() + 20
            while trainer.state.step < until_step and time.monotonic() < deadline:
                time.sleep(0.01)
            seen.append(trainer.state.step)
            return super().write_data(plan, planner)

    return Gated


def test_training_runs_on_while_the_checkpoint_is_written(corpus, tmp_path):
    run(corpus, tmp_path / "sync", async_checkpoint=False)
    trainer = Trainer(make_config(corpus, tmp_path / "async", 6, save_every=2, keep_checkpoints=10,
                                  async_checkpoint=True))
    seen = []
    trainer.checkpoints.writer = gated_writer(trainer, until_step=3, seen=seen)
    trainer.fit()
    assert seen[0] >= 3  # step 3 ran while the step-2 checkpoint was being written
    first = next(e for e in events(tmp_path / "async") if e["event"] == "checkpoint")
    assert first["step"] == 2 and first["published_at_step"] >= 3
    # ...and what it wrote is the state after step 2 (a staged copy), not the weights training moved on to
    assert checkpoints(tmp_path / "async") == checkpoints(tmp_path / "sync")


def test_a_rollback_waits_for_the_write_in_flight_and_chooses_as_the_synchronous_run(corpus, tmp_path):
    """The step-12 checkpoint is still being written when step 14 spikes: the rollback publishes it and
    goes back to it, as the synchronous run (whose step-12 checkpoint is on disk by then) does."""
    spike, seen = [FaultConfig(step=14, kind="scale_loss", value=50.0)], []
    for name, background in (("sync", False), ("async", True)):
        trainer = Trainer(spike_config(corpus, tmp_path / name, 18, "rollback", spike, save_every=4,
                                       async_checkpoint=background))
        if background:
            trainer.checkpoints.writer = gated_writer(trainer, until_step=14, seen=seen, only=12)
        trainer.fit()
    rollbacks = [[e for e in events(tmp_path / name) if e["event"] == "rollback"] for name in ("sync", "async")]
    assert seen == [14]  # the step-12 write was held back until the spike's step
    assert rollbacks[0][0]["to_step"] == 12 and rollbacks[1][0]["to_step"] == 12
    assert [m["loss"] for m in metrics(tmp_path / "async")] == [m["loss"] for m in metrics(tmp_path / "sync")]


class FullDiskAtStep4(FileSystemWriter):
    """A DCP writer whose step-4 write fails as a full disk does."""

    def write_data(self, plan, planner):
        if "step_00000004" in str(self.path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write_data(plan, planner)


def failed_save_message(corpus, run_dir, async_checkpoint) -> str:
    trainer = Trainer(make_config(corpus, run_dir, 6, save_every=2, keep_checkpoints=10,
                                  async_checkpoint=async_checkpoint))
    trainer.checkpoints.writer = FullDiskAtStep4
    with pytest.raises(ConfigError) as err:
        trainer.fit()
    kept = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [p.name for p in kept] == ["step_00000002"]
    verify_manifest(kept[0])  # intact
    assert not list((run_dir / "checkpoints").glob(".step_*"))  # the failed write's temporary removed
    return str(err.value).replace(str(run_dir), "RUN")


def test_a_failed_background_write_is_reported_as_a_failed_save(corpus, tmp_path):
    got = failed_save_message(corpus, tmp_path / "async", async_checkpoint=True)
    want = failed_save_message(corpus, tmp_path / "sync", async_checkpoint=False)
    assert got.startswith("Cannot write checkpoint step_00000004 under RUN/checkpoints (")
    assert "No space left on device" in got and "(step_00000002)" in got
    strip_space = [m.split(";")[0] + m.split(";", 1)[1].split(")", 1)[1] for m in (got, want)]
    assert strip_space[0] == strip_space[1]  # the same paragraph, free-space figures aside


COMMON = ["train.seq_len=32", "train.eval_every=0", "run.progress=false", "monitor.wandb=false",
          "monitor.report=false", "data.tokenizer=null"]


def test_kill_during_the_background_write_keeps_the_previous_checkpoint(corpus, tmp_path):
    common = [f"data.train_files=[{corpus['train']}]", f"data.val_files=[{corpus['val']}]", *COMMON,
              "run.save_every=4", "train.steps=12"]
    crash = "monitor.faults=[{step:8,kind:crash_in_checkpoint}]"  # async: in the writer thread, shards written
    first = run_cli(f"run.dir={tmp_path / 'run'}", *common, "run.async_checkpoint=true", crash, cwd=tmp_path)
    assert first.returncode == -signal.SIGKILL, first.stderr
    kept = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in kept.iterdir() if not p.name.startswith(".")) == ["step_00000004"]
    assert any(p.name.startswith(".step_00000008.tmp") for p in kept.iterdir())  # the half-written one
    second = run_cli(f"run.dir={tmp_path / 'run'}", *common, "run.async_checkpoint=true", crash, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    log = events(tmp_path / "run")
    assert any(e["event"] == "checkpoint_discarded" for e in log)
    assert next(e for e in log if e["event"] == "resume")["step"] == 4
    clean = run_cli(f"run.dir={tmp_path / 'clean'}", *common, cwd=tmp_path)  # synchronous, never killed
    assert clean.returncode == 0, clean.stderr
    assert [m["loss"] for m in metrics(tmp_path / "clean")] == [m["loss"] for m in metrics(tmp_path / "run")]
    assert checkpoints(tmp_path / "clean") == checkpoints(tmp_path / "run")


def test_preemption_with_a_write_in_flight_loses_nothing(corpus, tmp_path):
    """A checkpoint every step: when SIGUSR1 arrives, the one just started is still being written."""
    common = [f"data.train_files=[{corpus['train']}]", f"data.val_files=[{corpus['val']}]", *COMMON,
              "run.save_every=1", "run.keep_checkpoints=2", "train.steps=40"]
    straight = run_cli(f"run.dir={tmp_path / 'a'}", *common, cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    run_dir = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "moetron.train", f"run.dir={run_dir}", *common,
                             "run.async_checkpoint=true"], cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    stop = next(e for e in events(run_dir) if e["event"] == "preempted")
    assert 0 < stop["step"] < 40
    published = [e["step"] for e in events(run_dir) if e["event"] == "checkpoint"]
    assert published[-1] == stop["step"]  # the last save, in flight at the signal, was published
    assert (run_dir / "checkpoints" / f"step_{stop['step']:08d}" / "manifest.json").is_file()
    resumed = run_cli(f"run.dir={run_dir}", *common, "run.async_checkpoint=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert next(e for e in events(run_dir) if e["event"] == "resume")["step"] == stop["step"]
    a, b = metrics(tmp_path / "a"), metrics(run_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert json.loads((run_dir / "checkpoints" / "step_00000040" / "train_state.json").read_text())["step"] == 40
