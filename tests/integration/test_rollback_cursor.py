"""`monitor.spike.rollback_skip_batches`: after a rollback the data cursor is past the spike's batch plus
that many batches, by hand: with a constant batch of B sequences, a spike at step S rolled back to the
checkpoint of step C resumes reading at S*B + skip*B, and events.jsonl says skipped_sequences = (S - C + skip)*B."""

import json

from test_trainer import make_config

from moetron.config import FaultConfig, SpikeConfig
from moetron.train.trainer import Trainer

B, SKIP, SPIKE, SAVE_EVERY, STEPS = 8, 3, 8, 3, 9


def test_rollback_moves_the_cursor_past_the_skipped_batches(corpus, tmp_path):
    config = make_config(corpus, tmp_path / "run", STEPS, save_every=SAVE_EVERY)
    config.train.batch_ramp_start = config.train.global_batch_size = B  # constant batch: the cursor is countable
    config.train.eval_every = 0
    config.monitor.spike = SpikeConfig(policy="rollback", window=10, min_history=5, sigmas=4.0,
                                       rollback_skip_batches=SKIP)
    config.monitor.faults = [FaultConfig(step=SPIKE, kind="scale_loss", value=50.0)]
    trainer = Trainer(config.validate())
    reads = []
    read = trainer.data.train.batch

    def recording(start, count, **kwargs):
        reads.append((start, count))
        return read(start, count, **kwargs)

    trainer.data.train.batch = recording
    trainer.fit()

    events = [json.loads(line) for line in open(tmp_path / "run" / "events.jsonl")]
    (rollback,) = [e for e in events if e["event"] == "rollback"]
    restored = SPIKE - SPIKE % SAVE_EVERY  # the newest checkpoint before the spike: step 6
    cursor = SPIKE * B + SKIP * B
    assert (rollback["step"], rollback["to_step"]) == (SPIKE, restored)
    assert rollback["data_cursor"] == cursor
    assert rollback["skipped_sequences"] == (SPIKE - restored + SKIP) * B
    # The batches actually read: steps 1..S in order, then from the cursor on, never the skipped window.
    before = [(s * B, B) for s in range(SPIKE)]
    after = [(cursor + i * B, B) for i in range(STEPS - restored)]
    assert reads == before + after
