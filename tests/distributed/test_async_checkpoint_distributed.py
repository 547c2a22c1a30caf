"""run.async_checkpoint over 2 gloo ranks (dp 2 x EP 2, ZeRO-1: optimizer state saved as sharded chunks):
the background writes, whose DCP collectives run on their own group while the training thread's run on the
world, give the same checkpoints, byte for byte, and the same losses as the synchronous saves of the same
layout, with training steps completed while each write was held back."""

from __future__ import annotations

import json
import time
import warnings

from moetron.parallel.local import run_local
from test_trainer_distributed import TIMEOUT, make_config, metrics
from torch.distributed.checkpoint import FileSystemWriter

from moetron.config import ParallelConfig
from moetron.train.trainer import Trainer

DP2_EP2 = ParallelConfig(pp=1, dp=2, ep=2, schedule="1f1b", ranks_per_node=2)
UNIQUE_PER_SAVE = {".metadata", "manifest.json"}  # the save's directory and random id; the index's hash


def _train(rank: int, world: int, config, hold_back: bool) -> None:
    warnings.simplefilter("ignore")
    trainer = Trainer(config)
    if hold_back:  # the step-2 write waits until the training thread has finished step 3
        class HeldBack(FileSystemWriter):
            def write_data(self, plan, planner):
                deadline = time.monotonic() + 60
                while trainer.state.step < 3 and time.monotonic() < deadline:
                    time.sleep(0.01)
                return super().write_data(plan, planner)

        trainer.checkpoints.writer = HeldBack
    trainer.fit()


def saved(run_dir) -> dict:
    return {(p.parent.name, p.name): p.read_bytes() for p in sorted((run_dir / "checkpoints").glob("step_*/*"))
            if p.name not in UNIQUE_PER_SAVE}


def test_async_checkpoints_over_two_ranks_equal_the_synchronous_ones(corpus, tmp_path):
    for name, background in (("sync", False), ("async", True)):
        config = make_config(corpus, tmp_path / name, steps=4, parallel=DP2_EP2, save_every=2)
        config.run.async_checkpoint = background
        run_local(_train, 2, (config, background), timeout=TIMEOUT)
    want, got = saved(tmp_path / "sync"), saved(tmp_path / "async")
    assert {step for step, _ in want} == {"step_00000002", "step_00000004"}
    assert sum(file.endswith(".distcp") for _, file in want) >= 2  # both ranks wrote shards
    assert got.keys() == want.keys()
    assert all(got[k] == want[k] for k in want), [k for k in want if got[k] != want[k]]
    assert [m["loss"] for m in metrics(tmp_path / "async")] == [m["loss"] for m in metrics(tmp_path / "sync")]
    events = [json.loads(line) for line in open(tmp_path / "async" / "events.jsonl")]
    first = next(e for e in events if e["event"] == "checkpoint")
    assert first["step"] == 2 and first["published_at_step"] >= 3  # training ran on during the write
